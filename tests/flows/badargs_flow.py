from metaflow import FlowSpec, checkpoint, step


class BadArgsFlow(FlowSpec):
    @checkpoint(load_policy="sometimes")
    @step
    def start(self):
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    BadArgsFlow()
