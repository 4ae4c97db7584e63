"""The parts of stage-1 training that ``lowshot.train`` (the driver) composes.

* ``setup``: data, transforms, optimiser, sampler, schedule and the start-up checks;
* ``state``: ``TrainState`` (what a checkpoint holds, saved atomically and only when finite,
  restored on resume) and ``FiniteGuard`` (the deferred NaN/Inf check);
* ``epoch``: ``train_one_epoch`` and ``evaluate_epoch`` (held-out accuracy, few-shot validation,
  best-checkpoint selection).
"""
