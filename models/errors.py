"""The error type every package raises for problems the user can fix (bad input, bad config).

The CLIs print its message without a traceback, so the message must say what is wrong, where
(which file, which option), and what to do.
"""


class NeurofedError(Exception):
    """A user-fixable problem; its message is shown to the user as is."""
