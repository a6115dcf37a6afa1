"""The inference log's way in: every predicted row to the log store, off the request path, without loss.

Two halves, in two processes, so that writing the log never takes the model server's CPU (its
GIL) from answering requests:

- ``client.InferenceLogger``, in the model server: the request path makes one logged request per
  answer (one orjson call for its head, then the request body as it came) and appends it to a
  bounded queue; a thread hands the queue to the writer every ``flush_ms``, numbering the requests
  (their event ids) so that a hand-over sent again gets the same ids;
- ``writer.LogWriter``, in ``python -m serving.logger``: batches to the store, a spool on disk
  while the store is away, dead letters for what the store refuses.

The pipe between them and the spool's files share one format (``wire``).

What can be lost: on a clean stop (SIGTERM) nothing: the queue goes to the writer, which drains to
the store or the spool before it exits. If the model server crashes, what it had not handed over
yet: at most one flush interval of traffic (``flush_ms``, 200 ms by default); what the writer had
received it still writes (it ignores signals and stops at the end of its input). If the writer
crashes, what it had read and not yet stored and what sat in the pipe: about two flush intervals
of traffic while it keeps up (a hand-over it dies reading is sent again to the next writer). What
no queue can hold (the server's or the writer's queue full, the spool or the dead letters at
their cap) is dropped and counted (``mlops_log_events_dropped_total``), never waited for.
"""
