"""Data samplers for long-tailed training (Kang et al., ICLR 2020, Sec. 3.1), seeded and resumable.

``create_sampler(name, labels, **options)`` (alias ``build_sampler``) builds a registered sampler;
``register_sampler("name", needs_horizon=True)`` declares one that needs the training horizon (the
number of epochs, passed as ``horizon=`` and given to it as ``total_epochs``).

Kang et al. write every sampling strategy as "pick class j with probability p_j, then an image of
that class uniformly": p_j = n_j^q / sum_k n_k^q, with q = 1 instance-balanced, q = 0
class-balanced, q = 1/2 square-root, and progressively-balanced interpolating q = 1 -> q = 0 over
training. Here

* ``instance`` is plain shuffling WITHOUT replacement (every image once per epoch), which is what
  q = 1 means in practice and what every stage-1 baseline uses;
* ``class_balanced`` / ``sqrt`` / ``qpower`` / ``progressive`` draw WITH replacement: a class from
  p_j, then an image uniformly within that class;
* ``class_aware`` (Shen et al. 2016, the sampler of the official code) visits classes in reshuffled
  round-robin order and takes ``k`` consecutive images from a per-class reshuffled cycle.

Every sampler draws one *global* epoch order from a generator seeded with (seed, epoch), the same on
all ranks, so under DDP rank r takes positions r, r+R, r+2R, ... of it (wrapped at the end so all
ranks get the same length). The position inside the epoch is tracked globally, which makes resuming
mid-epoch exact, even with a different number of ranks.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..errors import CheckpointError, ConfigError, DataError
from ..registry import Registry

SAMPLERS: Registry = Registry("sampler")


def register_sampler(name: str | None = None, *aliases: str, needs_horizon: bool = False,
                     **meta: Any) -> Callable[[Any], Any]:
    """Decorator: register a sampler class ``cls(labels, *, ..., **base_options)``.

    ``needs_horizon``: the sampler takes ``total_epochs`` (the schedule's length), which
    ``create_sampler(..., horizon=epochs)`` fills in unless given.
    """
    return SAMPLERS.register(name, *aliases, needs_horizon=needs_horizon, **meta)


def needs_horizon(name: str) -> bool:
    """Whether sampler ``name`` declared that it needs the training horizon."""
    return bool(SAMPLERS.meta(name).get("needs_horizon", False))

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: decorrelates (seed, epoch) pairs


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """Generator for (seed, epoch); seed=0/epoch=1 and seed=1/epoch=0 give different draws."""
    return torch.Generator().manual_seed((int(seed) * _MIX + int(epoch) * 0x632BE59BD9B4E019 + 1) % (2**63))


def _labels_of(labels: Any) -> torch.Tensor:
    lab = getattr(labels, "labels", labels)  # accept a dataset with .labels
    lab = torch.as_tensor(lab, dtype=torch.long).reshape(-1)
    if lab.numel() == 0:
        raise DataError("cannot sample from an empty dataset (no labels)")
    if int(lab.min()) < 0:
        raise DataError(f"labels must be >= 0, got {int(lab.min())}")
    return lab


class LongTailSampler(Sampler[int]):
    """Base class: epoch draw, DDP sharding, ``set_epoch``, resume.

    Subclasses implement ``_draw(generator, epoch) -> LongTensor [num_samples]`` (global order).

    Resuming: ``state_dict(consumed=None)`` records the epoch and how far into it training got;
    ``consumed`` is the number of indices THIS rank took from the current iterator (pass
    ``batches_done * batch_size``; the default counts what the iterator yielded, which runs ahead
    of training when a DataLoader prefetches). ``load_state_dict`` (or ``set_start(index)``,
    index = samples this rank already consumed in the current epoch) makes the next iteration
    yield exactly the remaining indices; ``set_epoch`` to a *different* epoch starts it afresh.
    """

    name = "base"

    def __init__(self, labels: Any, *, num_samples: int | str | None = None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, num_classes: int | None = None) -> None:
        self.labels = _labels_of(labels)
        C = int(self.labels.max()) + 1 if num_classes is None else int(num_classes)
        if int(self.labels.max()) >= C:
            raise DataError(f"label {int(self.labels.max())} out of range for num_classes={C}")
        self.num_classes = C
        self.class_counts = torch.bincount(self.labels, minlength=C)
        if num_samples is None:
            num_samples = int(self.labels.numel())
        elif num_samples == "balanced":  # every class as large as the head (NOT the official epoch length)
            num_samples = int(self.class_counts.max()) * int((self.class_counts > 0).sum())
        elif isinstance(num_samples, str) or int(num_samples) < 1:
            raise ConfigError(f"num_samples must be a positive int, None or 'balanced', got {num_samples!r}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ConfigError(f"need 0 <= rank < num_replicas, got rank={rank}, num_replicas={num_replicas}")
        self.num_samples, self.seed = int(num_samples), int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.epoch = 0
        self._offset = 0  # global position where the current/next pass starts
        self._yielded = 0  # indices this rank yielded in the current pass
        self._done = False  # the last pass ran to its end
        order = torch.sort(self.labels, stable=True).indices  # images grouped by class, for O(1) lookup
        self._by_class = order
        self._starts = torch.cumsum(self.class_counts, 0) - self.class_counts

    # --- the draw ------------------------------------------------------------------------------
    def _draw(self, gen: torch.Generator, epoch: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def epoch_indices(self, epoch: int | None = None) -> torch.Tensor:
        """The global (all ranks) draw of an epoch, before sharding."""
        e = self.epoch if epoch is None else int(epoch)
        draw = self._draw(_epoch_generator(self.seed, e), e)
        assert draw.numel() == self.num_samples
        return draw

    def _sample_within(self, classes: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One uniformly chosen image of each class in ``classes`` (with replacement)."""
        n = self.class_counts[classes]
        r = torch.floor(torch.rand(classes.numel(), generator=gen, dtype=torch.float64) * n).long()
        r = torch.minimum(r, n - 1)
        return self._by_class[self._starts[classes] + r]

    def _draw_from_class_probs(self, probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        classes = torch.multinomial(probs, self.num_samples, replacement=True, generator=gen)
        return self._sample_within(classes, gen)

    # --- sharding / iteration ------------------------------------------------------------------
    def _remaining(self, offset: int) -> int:
        return math.ceil(max(self.num_samples - offset, 0) / self.num_replicas)

    def __len__(self) -> int:
        return self._remaining(0 if self._done else self._offset)

    def __iter__(self) -> Iterator[int]:
        if self._done:  # a new pass over the same epoch without set_epoch replays it from the start
            self._offset, self._done = 0, False
        offset, self._yielded = self._offset, 0
        per_rank = self._remaining(offset)
        need = offset + per_rank * self.num_replicas
        draw = self.epoch_indices()
        if need > draw.numel():  # pad by wrapping so every rank gets the same number of samples
            draw = draw.repeat(math.ceil(need / draw.numel()))
        mine = draw[offset + self.rank: need: self.num_replicas].tolist()
        return self._generate(mine)

    def _generate(self, mine: list[int]) -> Iterator[int]:
        for i in mine:
            self._yielded += 1
            yield i
        self._done = True

    # --- epoch / resume ------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's draw (deterministic in (seed, epoch)); a new epoch starts at 0."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self._offset, self._yielded, self._done = 0, 0, False

    def set_start(self, index: int) -> None:
        """Resume the current epoch after this rank consumed ``index`` samples of it."""
        if index < 0:
            raise ConfigError(f"start index must be >= 0, got {index}")
        self._offset = min(int(index) * self.num_replicas, self.num_samples)
        self._yielded, self._done = 0, False

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        c = self._yielded if consumed is None else int(consumed)
        return {"sampler": self.name, "seed": self.seed, "num_samples": self.num_samples,
                "dataset_size": int(self.labels.numel()), "num_replicas": self.num_replicas,
                "epoch": self.epoch, "offset": min(self._offset + c * self.num_replicas, self.num_samples)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, mine in (("sampler", self.name), ("seed", self.seed), ("num_samples", self.num_samples),
                          ("dataset_size", int(self.labels.numel()))):
            if key in state and state[key] != mine:
                raise CheckpointError(f"sampler state has {key}={state[key]!r} but this sampler has "
                                      f"{mine!r}; resuming would not continue the same epoch")
        try:
            self.epoch, self._offset = int(state["epoch"]), min(int(state["offset"]), self.num_samples)
        except KeyError as err:
            raise CheckpointError(f"sampler state lacks key {err.args[0]!r}") from None
        self._yielded, self._done = 0, False

    def class_probabilities(self, epoch: int | None = None) -> torch.Tensor:
        """Probability of drawing each class (theory; instance = n_j / N)."""
        return self.class_counts.double() / self.class_counts.sum()

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        extra = self.extra_repr()
        return (f"{type(self).__name__}(num_samples={self.num_samples}, seed={self.seed}, "
                f"rank={self.rank}/{self.num_replicas}{', ' + extra if extra else ''})")


def _power_probs(counts: torch.Tensor, q: float) -> torch.Tensor:
    """p_j ∝ n_j^q over classes present (empty classes never drawn, also when q = 0)."""
    present = counts > 0
    w = torch.zeros(counts.numel(), dtype=torch.float64)
    w[present] = counts[present].double() ** q
    return w / w.sum()


@register_sampler("instance", "instance_balanced")
class InstanceBalancedSampler(LongTailSampler):
    """Plain shuffling without replacement: each image once per epoch (q = 1).

    If ``num_samples`` exceeds the dataset, successive independent permutations are concatenated.
    """

    name = "instance"

    def _draw(self, gen: torch.Generator, epoch: int) -> torch.Tensor:
        n = int(self.labels.numel())
        perms = [torch.randperm(n, generator=gen) for _ in range(math.ceil(self.num_samples / n))]
        return torch.cat(perms)[: self.num_samples]


class _PowerSampler(LongTailSampler):
    """Class j with p_j ∝ n_j^q (``q`` a class attribute), then an image uniformly within it."""

    q = 1.0

    def __init__(self, labels: Any, **kw: Any) -> None:
        super().__init__(labels, **kw)
        self._probs = _power_probs(self.class_counts, self.q)

    def class_probabilities(self, epoch: int | None = None) -> torch.Tensor:
        return self._probs.clone()

    def _draw(self, gen: torch.Generator, epoch: int) -> torch.Tensor:
        return self._draw_from_class_probs(self._probs, gen)

    def extra_repr(self) -> str:
        return f"q={self.q}"


@register_sampler("qpower", "q_power")
class QPowerSampler(_PowerSampler):
    """Class j with p_j ∝ n_j^q, then an image uniformly within it (with replacement)."""

    name = "qpower"

    def __init__(self, labels: Any, *, q: float = 0.5, **kw: Any) -> None:
        if not math.isfinite(q):
            raise ConfigError(f"q must be finite, got {q}")
        self.q = float(q)
        super().__init__(labels, **kw)


@register_sampler("class_balanced", "class")
class ClassBalancedSampler(_PowerSampler):
    """Every class equally likely (q = 0), then an image uniformly within it (with replacement)."""

    name = "class_balanced"
    q = 0.0


@register_sampler("sqrt", "square_root")
class SquareRootSampler(_PowerSampler):
    """p_j ∝ sqrt(n_j) (q = 1/2, Mahajan et al. 2018), then an image uniformly within the class."""

    name = "sqrt"
    q = 0.5


@register_sampler("progressive", "progressively_balanced", needs_horizon=True)
class ProgressiveSampler(LongTailSampler):
    """p_j(t) = (1 - lam_t) p_j^IB + lam_t p_j^CB, lam_t = t / (T - 1), t the epoch, T = ``total_epochs``.

    As the official code: ``lams = np.linspace(0, 1, epochs)`` (classifier-balancing
    data/ClassPrioritySampler.py:313-314, the ``cycle=0`` shift of config/ImageNet_LT/feat_shift.yaml),
    epoch e uses ``lams[clip(e, 0, epochs - 1)]`` (``reset_weights``). So epoch 0 samples like
    instance-balanced (but with replacement) and the LAST epoch T - 1 is fully class-balanced;
    later epochs stay class-balanced. With T = 1 the single epoch is instance-balanced
    (``linspace(0, 1, 1) == [0]``).
    """

    name = "progressive"

    def __init__(self, labels: Any, *, total_epochs: int | None = None, **kw: Any) -> None:
        super().__init__(labels, **kw)
        if total_epochs is None or int(total_epochs) < 1:
            raise ConfigError(f"progressive sampler: total_epochs must be >= 1, got {total_epochs}")
        self.total_epochs = int(total_epochs)

    def class_probabilities(self, epoch: int | None = None) -> torch.Tensor:
        e = self.epoch if epoch is None else int(epoch)
        t = 0.0 if self.total_epochs == 1 else min(max(e / (self.total_epochs - 1), 0.0), 1.0)
        return (1 - t) * _power_probs(self.class_counts, 1.0) + t * _power_probs(self.class_counts, 0.0)

    def _draw(self, gen: torch.Generator, epoch: int) -> torch.Tensor:
        return self._draw_from_class_probs(self.class_probabilities(epoch), gen)

    def extra_repr(self) -> str:
        return f"total_epochs={self.total_epochs}"


@register_sampler("class_aware")
class ClassAwareSampler(LongTailSampler):
    """Class-aware sampling (Shen et al. 2016), as in Kang et al.'s official code.

    Classes are visited in round-robin order reshuffled after every full cycle; each visit takes
    ``samples_per_class`` (default 4) consecutive images from that class's own cycle, which is
    reshuffled every time it wraps, so within a class images repeat only after all were seen.
    Unlike the official iterator, the cycles restart from (seed, epoch) each epoch, which is what
    makes epochs reproducible and resumable.

    Epoch length: the official sampler's ``__len__`` is largest class size x number of classes
    (data/ClassAwareSampler.py ``num_samples``), but the official training loop stops every epoch
    after ``int(len(dataset) / batch_size)`` steps (run_networks.py:61-63 ``epoch_steps``, :263-266
    ``if step == self.epoch_steps: break``), i.e. about one pass of the dataset's size. The default
    ``num_samples=None`` (the dataset size) is that; ``num_samples="balanced"`` is the sampler's
    nominal length, which on ImageNet-LT (1280 x 1000 vs 115.8k images) trains ~11x longer.
    """

    name = "class_aware"

    def __init__(self, labels: Any, *, samples_per_class: int = 4, **kw: Any) -> None:
        super().__init__(labels, **kw)
        if int(samples_per_class) < 1:
            raise ConfigError(f"samples_per_class must be >= 1, got {samples_per_class}")
        self.samples_per_class = int(samples_per_class)

    def class_probabilities(self, epoch: int | None = None) -> torch.Tensor:
        return _power_probs(self.class_counts, 0.0)

    def _draw(self, gen: torch.Generator, epoch: int) -> torch.Tensor:
        k = self.samples_per_class
        present = torch.nonzero(self.class_counts > 0).reshape(-1)
        n_groups = math.ceil(self.num_samples / k)
        cycles = math.ceil(n_groups / present.numel())
        seq = torch.cat([present[torch.randperm(present.numel(), generator=gen)] for _ in range(cycles)])
        seq = seq[:n_groups]
        out = torch.empty(n_groups, k, dtype=torch.long)
        visits = torch.bincount(seq, minlength=self.num_classes)
        order = torch.sort(seq, stable=True).indices  # group positions, grouped by class
        pos_by_class = torch.split(order, visits.tolist())
        for c in torch.nonzero(visits).reshape(-1).tolist():
            n_c = int(self.class_counts[c])
            members = self._by_class[int(self._starts[c]): int(self._starts[c]) + n_c]
            need = int(visits[c]) * k
            stream = torch.cat([members[torch.randperm(n_c, generator=gen)]
                                for _ in range(math.ceil(need / n_c))])
            out[pos_by_class[c]] = stream[:need].view(-1, k)
        return out.reshape(-1)[: self.num_samples]

    def extra_repr(self) -> str:
        return f"samples_per_class={self.samples_per_class}"


def create_sampler(name: str, labels: Any, *, horizon: int | None = None, **options: Any) -> LongTailSampler:
    """``create_sampler("class_balanced", labels, seed=0, num_replicas=world, rank=r)``.

    ``horizon`` (the number of training epochs) goes to samplers that declared ``needs_horizon``
    as ``total_epochs`` unless that is given; other samplers ignore it. Unknown or wrong-typed
    options raise ``ConfigError`` naming the sampler and the option (``SAMPLERS.create``).
    """
    if horizon is not None and needs_horizon(name):
        options.setdefault("total_epochs", horizon)
    return SAMPLERS.create(name, labels, **options)


build_sampler = create_sampler


def list_samplers() -> list[str]:
    """Registered sampler names (aliases excluded), sorted."""
    return SAMPLERS.names()


__all__: Sequence[str] = ["SAMPLERS", "LongTailSampler", "InstanceBalancedSampler", "QPowerSampler",
                          "ClassBalancedSampler", "SquareRootSampler", "ProgressiveSampler",
                          "ClassAwareSampler", "build_sampler", "create_sampler", "list_samplers",
                          "needs_horizon", "register_sampler"]
