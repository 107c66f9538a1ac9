"""Tasks: the state machine and the delivery of each change's envelope (service.py: TaskService,
every change of a task's state; EventsService, the publisher), whether the log reaches back to a
resume point (history.py), the worker that runs attempts (worker.py), the agents (agents.py), the
LLM providers (llm.py) and the HTTP client under the OpenAI SDK (llm_http.py: bounded bodies, no
redirect to another origin).

May import droid.store, droid.quotas, droid.errors, droid.util, droid.config; never droid.http
or droid.realtime (they subscribe to the publisher instead).
"""
