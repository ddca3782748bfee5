"""The stages, by command name: what `qtool.cli` makes commands of and `qtool.recipe` runs.

(The submodules are imported as modules, so `qtool.stages.calibrate` stays the module and its
stage object is `qtool.stages.calibrate.calibrate`.)"""

from qtool.stages import calibrate, pack, reorder, train_blockap, tune_e2e
from qtool.stages import eval as eval_
from qtool.stages.base import Stage

STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        calibrate.calibrate,
        reorder.reorder,
        train_blockap.train_blockap,
        tune_e2e.tune_e2e,
        pack.pack,
        eval_.evaluate,
    )
}
