"""Tasks: the state machine (service.py: every change of a task's state, each one published),
the publisher of their envelopes (publisher.py), the worker that runs attempts (worker.py), the
agents (agents.py) and the LLM providers (llm.py).

May import droid.store, droid.errors, droid.util, droid.config; never droid.http or
droid.realtime (they subscribe to the publisher instead).
"""
