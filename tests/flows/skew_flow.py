"""Three attempts of one task; the test runs attempt 1 on a clock an hour behind.

Attempt 0 saves "0" and fails; attempt 1 resumes from it, saves "1" and fails; attempt 2
must resume from "1", the newest save, although its id carries the earlier timestamp.
"""

import os

from metaflow import FlowSpec, checkpoint, current, retry, step


def result(key, value):
    print(f"RESULT {key}={value}")


class SkewFlow(FlowSpec):
    @checkpoint
    @retry(times=2, minutes_between_retries=0)
    @step
    def start(self):
        path = os.path.join(current.checkpoint.directory, "state.txt")
        attempt = current.retry_count
        if attempt == 0:
            assert not current.checkpoint.is_loaded
        else:
            with open(path) as f:
                loaded = f.read()
            result(f"loaded_by_{attempt}", loaded)
        if attempt == 1:
            assert loaded == "0", loaded
        if attempt < 2:
            with open(path, "w") as f:
                f.write(str(attempt))
            current.checkpoint.save()
            raise RuntimeError(f"simulated failure of attempt {attempt}")
        result("loaded", loaded)
        result("listed", ",".join(str(c["attempt"]) for c in current.checkpoint.list()))
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    SkewFlow()
