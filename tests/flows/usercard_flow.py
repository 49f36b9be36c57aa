"""Steps with a card of the user's own, above and below @checkpoint, next to ours."""

import os

from metaflow import FlowSpec, card, checkpoint, current, step
from metaflow.cards import Markdown


def save_twice():
    with open(os.path.join(current.checkpoint.directory, "state.txt"), "w") as f:
        f.write("state")
    current.checkpoint.save(name="first")
    current.checkpoint.save(name="second", wait=True)


class UserCardFlow(FlowSpec):
    @checkpoint
    @card(type="blank")
    @step
    def start(self):
        current.card.append(Markdown("user card of start"))
        save_twice()
        self.next(self.train)

    @card(type="blank", id="mine")
    @checkpoint
    @step
    def train(self):
        current.card["mine"].append(Markdown("user card of train"))
        save_twice()
        self.next(self.end)

    @step
    def end(self):
        pass


if __name__ == "__main__":
    UserCardFlow()
