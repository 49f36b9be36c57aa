"""Twenty saves with keep_last=3, keep_best=2; a retry that resumes and saves four more.

The best losses (epochs 4 and 8) are not among the last three. The first attempt fails
after its saves; the second prints what it finds (the first attempt's retention done),
then saves epochs 20-23, all worse: the checkpoint it resumed from (19) must survive.
"""

import json
import os

from metaflow import FlowSpec, checkpoint, current, retry, step

BEST = {4: 0.1, 8: 0.2}


def loss(epoch):
    return BEST.get(epoch, 0.99 if epoch >= 20 else 0.5 + 0.01 * epoch)


class RetentionFlow(FlowSpec):
    @retry(times=1, minutes_between_retries=0)
    @checkpoint(keep_last=3, keep_best=2, best_metric="val_loss")
    @step
    def start(self):
        d = current.checkpoint.directory
        if current.retry_count == 0:
            todo = range(20)
        else:
            with open(os.path.join(d, "epoch.txt")) as f:
                print("RESULT loaded=%s" % f.read())
            print("RESULT listed=%s" % json.dumps(
                [r["metadata"]["epoch"] for r in current.checkpoint.list()]))
            todo = range(20, 24)
        for epoch in todo:
            with open(os.path.join(d, "epoch.tmp"), "w") as f:
                f.write(str(epoch))
            os.replace(os.path.join(d, "epoch.tmp"), os.path.join(d, "epoch.txt"))
            current.checkpoint.save(metadata={"epoch": epoch, "val_loss": loss(epoch)})
        if current.retry_count == 0:
            raise RuntimeError("failing on purpose after 20 saves")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    RetentionFlow()
