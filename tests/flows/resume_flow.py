"""Attempt 0 saves twice and fails; attempt 1 must resume from the latest=True checkpoint."""

import json
import os

from metaflow import FlowSpec, checkpoint, current, retry, step


def result(key, value):
    print(f"RESULT {key}={value}")


class ResumeFlow(FlowSpec):
    @step
    def start(self):
        self.next(self.train)

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        path = os.path.join(current.checkpoint.directory, "state.txt")
        if current.retry_count == 0:
            assert not current.checkpoint.is_loaded
            with open(path, "w") as f:
                f.write("epoch=3")
            current.checkpoint.save(metadata={"epoch": 3})
            # A new file renamed over the old one: the pending upload above is untouched.
            with open(path + ".tmp", "w") as f:
                f.write("epoch=4-not-latest")
            os.replace(path + ".tmp", path)
            current.checkpoint.save(name="side", latest=False)
            raise RuntimeError("simulated crash after saving")
        result("loaded", current.checkpoint.is_loaded)
        with open(path) as f:
            result("content", f.read())
        result("info_attempt", current.checkpoint.info["attempt"])
        # Metadata JSON cannot hold is stored as a placeholder, with a warning: never a failure.
        odd = current.checkpoint.save(name="odd_metadata", metadata={"loss": object(),
                                                                      "epoch": 3},
                                      latest=False, wait=True)
        result("odd_metadata", json.dumps(odd["metadata"]))
        result("info_metadata", current.checkpoint.info.metadata)
        # Writes into the staging directory after a load must not reach the stored copy.
        with open(path, "w") as f:
            f.write("scribbled over")
        ref = current.checkpoint.save(wait=True)
        result("durable", os.path.exists(os.path.join(ref["datastore_root"], ref["key"])))
        result("state", ref.state)
        listed = current.checkpoint.list()
        result("listed", ",".join(f"{c['name']}@{c['attempt']}" for c in listed))
        self.ref = ref
        self.next(self.end)

    @step
    def end(self):
        result("artifact_type", type(self.ref).__name__)


if __name__ == "__main__":
    ResumeFlow()
