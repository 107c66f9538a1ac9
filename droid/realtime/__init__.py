"""Everything about /events, the Socket.IO namespace that pushes task envelopes to their owners.

endpoint.py builds it; wire.py is what it looks like on the wire; adapter.py is the one user of
Tornado's, python-engineio's and python-socketio's private names; transport.py, queue.py and
pings.py carry Engine.IO over WebSockets (queue.py holds the slow-consumer bound); guard.py
checks origins and packets; gateway.py is the namespace; delivery.py and replay.py write each
user's envelopes to their sockets in order, exactly once; cluster.py and presence.py spread
envelopes and connection counts over processes through Redis. docs/architecture.md walks
through it.

May import droid.tasks (the publisher), droid.apikeys, droid.auth, droid.store, droid.config,
droid.errors, droid.web, droid.util; never droid.http.
"""
