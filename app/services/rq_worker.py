"""The rq worker class of `privface worker`: rq's own Worker, but an idle one stops at once on SIGTERM.

rq 3.0's teardown unsubscribes the worker's pubsub channel and then stops the listener thread. With redis-py 8.2
`PubSubWorkerThread.stop()` joins the thread without a bound, and the listener, once it has read the unsubscribe
confirmation while its running flag is still set, goes on to wait up to 60 s for a subscription that never comes.
So a SIGTERM to an idle worker sometimes took a minute to take effect (2 of 25 stops under CPU load, 2026-12-04;
seen as a failed teardown in a full test run), long enough for an orchestrator's grace period to end in SIGKILL.
Clearing the running flag *before* unsubscribing lets the confirmation wake the listener into an exit.
"""
from __future__ import annotations

from rq import Worker

LISTENER_EXIT_S = 10.0  # the listener exits as soon as the unsubscribe confirmation arrives; this only bounds it


class PromptStopWorker(Worker):
    """rq's Worker with a teardown whose pubsub listener stops before the channel is unsubscribed."""

    def unsubscribe(self) -> None:
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None or pubsub is None:
            return
        self.log.info("Worker %s: unsubscribing from channel %s", self.name, self.pubsub_channel_name)
        thread.stop(timeout=0)  # only clears the running flag here: the listener still blocks on its socket
        pubsub.unsubscribe()  # the confirmation wakes the listener, which sees the flag and closes the pubsub
        thread.join(timeout=LISTENER_EXIT_S)
        pubsub.close()
