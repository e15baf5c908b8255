"""portolan: the overlay network's directory and SVP lookup service.

What it answers
---------------
Every compute node's varpd asks portolan, over SVP (TCP 1296), "which underlay host holds this
virtual MAC in this vnet?" (VL2), "which MAC holds this virtual IP?" (VL3), "which remote
network serves this destination?" (v2 ROUTE), and "what went stale for me?" (the shootdown
log: LOG_REQ / LOG_RM). Operators describe the network through the HTTP management API or
import a starting state with ``portolan load``.

The path data takes
-------------------
::

    management API (portolan.api)      portolan load (portolan.cli.load)
                 \\                        /
                  Directory (service.py): validate, one store transaction per change
                  |   writes the mapping rows + one shootdown log row per recipient CN
                  v
    store (store/: SQLite | PostgreSQL) -- the source of truth
                  |   after each commit, in the same task: index.apply(change)
                  v
    LookupIndex (index.py) -- dicts in memory; answers every lookup
                  |
    SVP server (svp_server.py) -- trio, one task per connection, in-order replies
        VL2/VL3/ROUTE  -> index (no I/O)
        LOG_REQ/LOG_RM -> Directory.fetch_log / remove_log -> store (worker thread)

``portolan serve`` (cli/serve.py) runs it all in one trio run: the SVP server, the API
(hypercorn on trio), ``/metrics`` (metrics.py's registry, served by the shared `httpmetrics`
responder) and one task that keeps the index
in step with writes made by other processes:

- SQLite: `follow_store` reloads the whole index when another process (``portolan load`` on
  the same file) moved the store's change counter ahead of it;
- PostgreSQL (several portolan instances may share one database): ``coherence.Coherence``
  LISTENs for ``portolan_changes`` and folds the changes feed (``store/notify.py``) into the
  index key by key, under the Directory's write lock; after a lost LISTEN connection it
  reloads in full.

It prints ``READY svp=H:P api=H:P metrics=H:P`` once everything listens and exits 0 on
SIGINT/SIGTERM.

Coherence and invariants
------------------------
- The Directory is the only writer. A mapping change and its shootdown log rows commit in one
  transaction; the index is updated before the call returns, so an SVP answer is never older
  than the last change this process committed (no caches, no TTLs). Changes committed by
  other processes reach the index within ``--reload-interval`` (default 1 s) on SQLite, and
  as soon as their NOTIFY arrives on PostgreSQL.
- A compute node's log entry lives until that node removes it with LOG_RM: nothing is lost
  across restarts of portolan or of varpd.
- A LOG_ACK body, status word included, never exceeds the client's ``count``; a reply always
  carries its request's id (verbatim) and version.
- Malformed SVP input closes that connection only, and is counted by kind; FATAL is sent only
  for failures on our side. The server never crashes on input.

What may block
--------------
Nothing in the SVP lookup path: index reads are dict gets on the trio thread. Store work runs
in ``trio.to_thread.run_sync`` under the Directory's limiter (1 for SQLite): API writes,
LOG_REQ/LOG_RM (each waits in its own connection's order; other connections go on), index
reloads, PostgreSQL catch-ups; the LISTEN connection waits in its own worker thread. Loading
the index (startup, reload) is CPU work on the trio thread.

Where to change what
--------------------
Wire format: ``protocol/svp.py``. Lookup answers: ``index.py``. Business rules and shootdown
recipients: ``service.py``. SVP connection handling, the bulk format, FATAL policy:
``svp_server.py``. Cross-instance coherence (PostgreSQL): ``coherence.py``. Counters:
``metrics.py``. Commands: ``cli/`` (``portolan demo`` execs ``python -m lab demo``: the
demo assembles portolan and varpd, so it lives in ``lab/``; portolan never imports varpd or lab).
"""
