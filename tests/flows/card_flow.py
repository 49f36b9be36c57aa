"""Saves a few checkpoints, the last with wait=True, for the checkpoint card to show.

Environment knobs (read in every process of the run, so the runtime and the task agree):
CARD_FLOW_SHOW_CARD=0 runs the step with ``@checkpoint(show_card=False)``;
CARD_FLOW_FAIL_FIRST=1 makes attempt 0 save and then fail, so attempt 1 loads its save;
CARD_FLOW_TIME_FINISH=1 prints how long the card's end-of-task work took;
CARD_FLOW_TRAIN_SECONDS=N keeps saving for N seconds first, so the card refreshes live;
CARD_FLOW_STOP_FILE=PATH ends that sooner, once PATH exists.
"""

import os
import time

from metaflow import FlowSpec, checkpoint, current, retry, step

SHOW_CARD = os.environ.get("CARD_FLOW_SHOW_CARD", "1") == "1"
FAIL_FIRST = os.environ.get("CARD_FLOW_FAIL_FIRST") == "1"
TRAIN_SECONDS = float(os.environ.get("CARD_FLOW_TRAIN_SECONDS", "0"))
STOP_FILE = os.environ.get("CARD_FLOW_STOP_FILE")

if os.environ.get("CARD_FLOW_TIME_FINISH") == "1":
    from metaflow_extensions.asynccheckpoint.plugins.card import checkpoint_card as _card

    _finish = _card.CheckpointCard.finish

    def _timed_finish(self, *, task_ok, reason=None):
        t0 = time.perf_counter()
        try:
            _finish(self, task_ok=task_ok, reason=reason)
        finally:
            print("RESULT card_finish_s=%.6f" % (time.perf_counter() - t0), flush=True)

    _card.CheckpointCard.finish = _timed_finish


def result(key, value):
    print(f"RESULT {key}={value}", flush=True)


class CardFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint(show_card=SHOW_CARD)
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        d = current.checkpoint.directory
        if FAIL_FIRST and current.retry_count == 0:
            with open(os.path.join(d, "weights.bin"), "wb") as f:
                f.write(b"w" * 1000)
            current.checkpoint.save(name="before_crash", wait=True)
            raise RuntimeError("simulated crash after saving")
        result("loaded", current.checkpoint.is_loaded)
        deadline = time.monotonic() + TRAIN_SECONDS
        while time.monotonic() < deadline and not (STOP_FILE and os.path.exists(STOP_FILE)):
            # stands in for training between saves
            with open(os.path.join(d, "weights.tmp"), "wb") as f:
                f.write(b"t" * (1 << 20))
            os.replace(os.path.join(d, "weights.tmp"), os.path.join(d, "weights.bin"))
            current.checkpoint.save(name="training")
            time.sleep(0.25)
        for epoch in range(3):
            # A new file renamed over the old one, so no save is torn.
            with open(os.path.join(d, "weights.tmp"), "wb") as f:
                f.write(bytes([epoch]) * ((epoch + 1) << 20))
            os.replace(os.path.join(d, "weights.tmp"), os.path.join(d, "weights.bin"))
            current.checkpoint.save(name=f"epoch{epoch}", metadata={"epoch": epoch})
        self.final = current.checkpoint.save(name="final", wait=True)
        result("final_state", self.final.state)
        result("body_end", time.time())
        self.next(self.end)

    @step
    def end(self):
        result("end_start", time.time())


if __name__ == "__main__":
    CardFlow()
