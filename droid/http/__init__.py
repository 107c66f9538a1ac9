"""The HTTP front door and the REST API: the application and its limits (front.py), the base
handler (base.py), the REST handlers (api.py; API keys in keys.py, webhook endpoints and their
deliveries in webhooks.py), stored events and their SSE stream (eventlog.py), health, metrics,
the OpenAPI document and the page (system.py, openapi.py), request schemas (schemas.py) and login
rate limits (ratelimit.py).

May import droid.tasks, droid.apikeys, droid.webhooks, droid.auth, droid.store, droid.config,
droid.emails, droid.quotas, droid.errors, droid.web, droid.util; never droid.realtime.
"""
