"""What the coordinator and the sites agree on: the run's settings, the wire names of messages, the
schema of every reply a site may send, the run directory's layout and the evaluation document's schema.

A leaf over models/ (it imports only the standard library and ``models.errors``): both client/ (the
site) and server/ (the coordinator) import it, and neither imports the other. A fact both sides need is
defined here once.
"""
