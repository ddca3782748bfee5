"""Test hooks inside the ranks of a distributed run. Python imports this at start-up in every process
that has this folder on its PYTHONPATH (the tests put it there for the ranks the launcher starts);
it does nothing unless QTOOL_TEST_KILL or QTOOL_TEST_TRAINED is set.

QTOOL_TEST_KILL=R:I   rank R SIGKILLs itself once rank 0 has saved journal entry I (block or step)
QTOOL_TEST_TRAINED=F  rank 0 appends the index of every block it trains (not read from the journal) to F
"""

import os

if os.environ.get("QTOOL_TEST_KILL"):
    import signal

    from qtool.core import distributed

    _rank, _index = map(int, os.environ["QTOOL_TEST_KILL"].split(":"))
    _save = distributed.SharedJournal.save

    def _save_then_die(self, block, tensors):
        _save(self, block, tensors)
        if block == _index:
            distributed.barrier()  # rank 0 has written entry I
            if int(os.environ.get("RANK", "0")) == _rank:
                os.kill(os.getpid(), signal.SIGKILL)

    distributed.SharedJournal.save = _save_then_die

if os.environ.get("QTOOL_TEST_TRAINED"):
    from qtool.quant import blockwise_train

    _fit = blockwise_train.fit_block

    def _recorded_fit(*args, **kwargs):
        if os.environ.get("RANK") == "0":
            with open(os.environ["QTOOL_TEST_TRAINED"], "a") as fh:
                fh.write(f"{args[9]}\n")
        return _fit(*args, **kwargs)

    blockwise_train.fit_block = _recorded_fit
