"""Errors of the privacy package that a user can fix (bad DP settings, a spent budget, a damaged ledger).

privacy/ is a leaf package, so these do not derive from ``models.errors.NeurofedError``; the CLIs catch
``PrivacyError`` beside it and print its message without a traceback. Messages say what is wrong, where
(which file or option) and what to do.
"""


class PrivacyError(Exception):
    """A user-fixable privacy problem; its message is shown to the user as is."""


class PrivacyBudgetExceeded(PrivacyError):
    """A round would take the site's spent ε above its lifetime budget; the site must not train it.

    ``reason`` is the sentence a site sends to the coordinator when it declines the round.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
