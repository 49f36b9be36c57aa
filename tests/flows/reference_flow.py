"""A saved reference loads in a later step, and (passed as a parameter) in a later run."""

import json
import os

from metaflow import FlowSpec, Parameter, checkpoint, current, step


class ReferenceFlow(FlowSpec):
    earlier = Parameter("earlier", default="", help="JSON of a reference from an earlier run")

    @checkpoint
    @step
    def start(self):
        d = current.checkpoint.directory
        os.makedirs(os.path.join(d, "nested"))
        with open(os.path.join(d, "nested", "payload.txt"), "w") as f:
            f.write(f"payload of {current.run_id}")
        self.ref = current.checkpoint.save(metadata={"note": "hello"})
        self.next(self.use)

    @checkpoint(load_policy="none")
    @step
    def use(self):
        out = current.checkpoint.load(self.ref)
        with open(os.path.join(out, "nested", "payload.txt")) as f:
            print(f"RESULT later_step={f.read()}")
        if self.earlier:
            target = os.path.join(current.checkpoint.directory, "earlier")
            current.checkpoint.load(json.loads(self.earlier), path=target)
            with open(os.path.join(target, "nested", "payload.txt")) as f:
                print(f"RESULT later_run={f.read()}")
        listed = current.checkpoint.list(task=self.ref["pathspec"])
        print(f"RESULT listed_other_task={[c['key'] for c in listed] == [self.ref['key']]}")
        print(f"RESULT listed_own_task={current.checkpoint.list()}")
        print(f"RESULT ref_json={json.dumps(self.ref)}")
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    ReferenceFlow()
