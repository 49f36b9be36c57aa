"""Train an XGBoost model, checkpoint the booster every few rounds, survive a crash.

    pip install '.[xgboost]' && USERNAME=demo python examples/xgboost_resume.py run

A training callback saves the booster into `current.checkpoint.directory` every
`--save-every` rounds. The first attempt of `train` fails on purpose after round 35;
`@retry` starts a second attempt, which finds the booster of round 30 already loaded
and boosts only the rounds that are left. The data is synthetic and made in the flow.
"""

import os

import numpy as np
import xgboost as xgb
from metaflow import FlowSpec, Parameter, checkpoint, current, retry, step


class XGBoostResumeFlow(FlowSpec):
    rounds = Parameter("rounds", default=60, help="Boosting rounds in all.")
    save_every = Parameter("save-every", default=10, help="Checkpoint every this many rounds.")
    fail_at = Parameter(
        "fail-at", default=35,
        help="Round after which the first attempt fails on purpose (-1: never).")
    seed = Parameter("seed", default=0, help="Seed for the synthetic data.")

    @step
    def start(self):
        self.next(self.train)

    @checkpoint
    @retry(times=1, minutes_between_retries=0)
    @step
    def train(self):
        # A nonlinear regression target, the same in every attempt.
        rng = np.random.default_rng(self.seed)
        x = rng.normal(size=(4000, 10))
        y = np.sin(x[:, 0]) + x[:, 1] * x[:, 2] + 0.1 * rng.normal(size=len(x))
        dtrain = xgb.DMatrix(x[:3000], label=y[:3000])
        dvalid = xgb.DMatrix(x[3000:], label=y[3000:])
        params = {"objective": "reg:squarederror", "eta": 0.1, "max_depth": 4,
                  "tree_method": "hist", "nthread": 1, "seed": self.seed}

        path = os.path.join(current.checkpoint.directory, "booster.ubj")
        booster = None
        self.resumed_from = None
        if current.checkpoint.is_loaded:
            booster = xgb.Booster(model_file=path)
            self.resumed_from = booster.num_boosted_rounds()
            print(f"Resuming at round {self.resumed_from} from the checkpointed booster "
                  f"(saved by attempt {current.checkpoint.info['attempt']})")
        done = 0 if booster is None else booster.num_boosted_rounds()

        callbacks = [SaveBooster(path, every=self.save_every)]
        if current.retry_count == 0 and self.fail_at >= 0:
            callbacks.append(FailOnce(self.fail_at))
        booster = xgb.train(params, dtrain, num_boost_round=self.rounds - done,
                            evals=[(dvalid, "valid")], xgb_model=booster,
                            callbacks=callbacks, verbose_eval=False)

        prediction = booster.predict(dvalid)
        self.rmse = float(np.sqrt(np.mean((prediction - dvalid.get_label()) ** 2)))
        self.rounds_done = booster.num_boosted_rounds()
        self.next(self.end)

    @step
    def end(self):
        if self.resumed_from is None:
            print(f"Trained {self.rounds_done} rounds without a resume; "
                  f"final validation rmse {self.rmse:.6f}")
        else:
            print(f"Resumed from round {self.resumed_from}; "
                  f"final validation rmse {self.rmse:.6f}")


class SaveBooster(xgb.callback.TrainingCallback):
    """Saves the booster every `every` rounds and checkpoints it without blocking."""

    def __init__(self, path, every):
        super().__init__()
        self.path = path
        self.every = every

    def after_iteration(self, model, epoch, evals_log):
        # `epoch` restarts at 0 when training continues from a loaded booster; the
        # booster knows how many rounds it holds.
        rounds = model.num_boosted_rounds()
        if rounds % self.every == 0:
            rmse = evals_log["valid"]["rmse"][-1]
            print(f"round {rounds} valid rmse {rmse:.6f}")
            # save_model rewrites the file in place; save() returns at once and the
            # upload runs while the next rounds are boosted.
            model.save_model(self.path)
            current.checkpoint.save(metadata={"round": rounds, "valid_rmse": float(rmse)})
        return False  # keep training


class FailOnce(xgb.callback.TrainingCallback):
    """Stands in for a crash: raises after round `at`."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def after_iteration(self, model, epoch, evals_log):
        if model.num_boosted_rounds() == self.at:
            raise RuntimeError(
                f"Deliberate failure after round {self.at} of the first attempt: "
                "@retry resumes from the checkpoint.")
        return False


if __name__ == "__main__":
    XGBoostResumeFlow()
