"""Spiking ResNets: one skeleton, the connection as an enum, depths as a table, names in a registry.

``create_model(name, **overrides)`` builds ``<family><depth>`` for the families in ``FAMILIES`` and the depths in
``DEPTHS``. Activations are ``[T, N, C, H, W]``; convolutions and BatchNorm see ``[T * N, C, H, W]`` views.

Skeleton (SEW-ResNet's, see DANET.md): stem conv7x7/2 + BN (conv3x3/1 + BN, no max-pool, when
``input_size <= 64``), computed once on the static image and repeated over T in one place (a broadcast view, no
copy; the batch statistics of the repeated batch equal those of the images), then the neuron (spiking domain)
and max-pool; four stages of basic or bottleneck blocks (widths ``width * (1, 2, 4, 8)``, stride on the 3x3
conv); head: global average pool of the stream, FC per time step -> ``[T, N, num_classes]`` (for a membrane
stream the FC sees real values: MACs, counted so by the telemetry). The loop averages over T.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import bn_neuron as fused_bn
from . import checkpointing
from .checkpointing import BatchNorm
from .connections import Connection, DASpec, DenseWeights, GradStash, domain_of
from .layout import flat_seq, repeat_time, spatial_mean
from .neurons import NeuronSpec, make_neuron

# depth -> (block kind, blocks per stage): the standard ResNet tables.
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}

# family -> its own connection ("default" in the config).
FAMILIES: dict[str, Connection] = {
    "danet": Connection.DA,
    "spiking_resnet": Connection.SPIKING,
    "sew_resnet": Connection.SEW_ADD,
    "ms_resnet": Connection.MEMBRANE,
}

# Overrides accepted by create_model, with their defaults (the model config group's fields).
DEFAULTS: dict[str, Any] = {
    "num_classes": 1000,
    "T": 4,
    "width": 64,
    "in_channels": 3,
    "input_size": 224,
    "connection": "default",
    "da": None,
    "neuron": None,
    "zero_init_residual": False,
    "checkpointing": "none",
    "spike_storage": "float",
    "memory_budget_gb": 0.0,
    "fuse_bn_neuron": "auto",
    "fuse_da": False,
}


def _fuse_mode_ok(mode: object) -> bool:
    """``fuse_bn_neuron``'s values: True, False or "auto"."""
    return isinstance(mode, bool) or mode == "auto"


def _seq(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Apply a per-image module to a ``[T, N, ...]`` sequence (in its own memory layout)."""
    return module(flat_seq(x)).unflatten(0, x.shape[:2])


class ConvBN(nn.Module):
    """conv + BN over ``[T, N, C, H, W]``; ``spike_input``: the input is a neuron's output (see spike storage)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, spike_input: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False)
        self.bn = BatchNorm(cout)
        self.spike_input = spike_input
        self.spike_storage = "float"

    def conv_seq(self, x: torch.Tensor) -> torch.Tensor:
        flat = flat_seq(x)
        if self.spike_input:
            y = checkpointing.spike_conv2d(flat, self.conv, self.spike_storage)
        else:
            y = self.conv(flat)
        return y.unflatten(0, x.shape[:2])

    def bn_seq(self, y: torch.Tensor) -> torch.Tensor:
        return self.bn(flat_seq(y)).unflatten(0, y.shape[:2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_seq(self.conv_seq(x))


class Branch(nn.Module):
    """A residual branch F. style: post = [conv BN SN]* conv BN; sew = [conv BN SN]+; pre = [SN conv BN]+."""

    def __init__(self, kind: str, cin: int, planes: int, stride: int, style: str, neuron: NeuronSpec) -> None:
        super().__init__()
        if kind == "basic":
            specs = [(cin, planes, 3, stride), (planes, planes, 3, 1)]
        else:
            specs = [(cin, planes, 1, 1), (planes, planes, 3, stride), (planes, planes * 4, 1, 1)]
        self.style = style
        self.units = nn.ModuleList(
            ConvBN(*s, spike_input=style == "pre" or i > 0) for i, s in enumerate(specs)
        )
        n_neurons = len(specs) - 1 if style == "post" else len(specs)
        self.neurons = nn.ModuleList(make_neuron(neuron) for _ in range(n_neurons))
        self.policy = "none"
        self.fuse_bn_neuron: bool | str = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # ops in order; a BatchNorm followed by a neuron (and a leading neuron) is one segment for `time`
        n = len(self.units)
        for i, unit in enumerate(self.units):
            if self.style == "pre":
                if i == 0:
                    x = checkpointing.run_segment(self.neurons[0], x, policy=self.policy)
                x = unit.conv_seq(x)
                if i + 1 < n:
                    x = checkpointing.run_segment(self._bn_neuron(i, i + 1), x, policy=self.policy)
                else:
                    x = unit.bn_seq(x)
            else:
                x = unit.conv_seq(x)
                if i < len(self.neurons):
                    x = checkpointing.run_segment(self._bn_neuron(i, i), x, policy=self.policy)
                else:
                    x = unit.bn_seq(x)
        return x

    def _bn_neuron(self, unit: int, neuron: int):
        bn, bn_seq, sn = self.units[unit].bn, self.units[unit].bn_seq, self.neurons[neuron]
        mode = self.fuse_bn_neuron
        if mode:  # (bn_neuron runs the pair itself where the fusion does not apply, or for auto is not faster)
            return lambda y: fused_bn.bn_neuron(y, bn, sn, only_where_faster=mode == "auto")
        return lambda y: sn(bn_seq(y))


class Projection(nn.Module):
    """Shortcut to a new shape: [avgpool(f)] + conv1x1(stride) + BN [+ SN]."""

    def __init__(self, cin: int, cout: int, stride: int, pool: int = 1, neuron: NeuronSpec | None = None):
        super().__init__()
        self.pool = nn.AvgPool2d(pool, pool, ceil_mode=True, count_include_pad=False) if pool > 1 else None
        self.conv = nn.Conv2d(cin, cout, 1, stride, bias=False)
        self.bn = BatchNorm(cout)
        self.neuron = make_neuron(neuron) if neuron is not None else None
        self.fuse_bn_neuron: bool | str = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:2]
        x = flat_seq(x)
        if self.pool is not None:
            x = self.pool(x)
        x = self.conv(x)
        if self.neuron is None:
            return self.bn(x).unflatten(0, shape)
        if self.fuse_bn_neuron:
            return fused_bn.bn_neuron(x.unflatten(0, shape), self.bn, self.neuron,
                                      only_where_faster=self.fuse_bn_neuron == "auto")
        return self.neuron(self.bn(x).unflatten(0, shape))


class Stage(nn.Module):
    """One stage of ``blocks`` blocks; combines branches and shortcuts as its connection says."""

    def __init__(
        self,
        kind: str,
        cin: int,
        planes: int,
        blocks: int,
        stride: int,
        connection: Connection,
        da: DASpec,
        neuron: NeuronSpec,
        earlier: list[tuple[int, int]],
    ) -> None:
        super().__init__()
        cout = planes * EXPANSION[kind]
        self.connection = connection
        self.domain = domain_of(connection, da)
        self.dense = connection is Connection.DA and da.weights == "learnable"
        self.network = connection is Connection.DA and da.span == "network"
        self.policy = "none"
        style = {"spiking": "post", "membrane": "pre"}.get(connection.value, "sew")
        if connection is Connection.DA:
            style = "pre" if da.domain == "membrane" else "sew"
        self.branches = nn.ModuleList(
            Branch(kind, cin if i == 0 else cout, planes, stride if i == 0 else 1, style, neuron)
            for i in range(blocks)
        )
        self.shortcut: Projection | None = None
        self.projections: nn.ModuleList | None = None
        if self.network:
            # one linear projection per earlier aggregate (channels, spatial factor); identity where unchanged
            self.projections = nn.ModuleList(
                nn.Identity() if (c == cout and f == 1) else Projection(c, cout, 1, pool=f)
                for c, f in earlier
            )
        elif stride != 1 or cin != cout:
            sn = neuron if self.domain == "spike" and connection is not Connection.SPIKING else None
            self.shortcut = Projection(cin, cout, stride, neuron=sn)
        self.post = (
            nn.ModuleList(make_neuron(neuron) for _ in range(blocks))
            if connection is Connection.SPIKING
            else None
        )
        self.weights = DenseWeights(blocks) if self.dense else None

    def _branch(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return checkpointing.run(self.branches[i], x, policy=self.policy)

    def _dense_branch(self, i: int, stash):
        weights, branch = self.weights, self.branches[i]
        assert weights is not None
        return lambda base, *ys: branch(weights.aggregate(base, list(ys), stash))

    def forward(self, inputs: list[torch.Tensor]) -> torch.Tensor:
        """``inputs``: earlier stage aggregates (network span) ending with this stage's input."""
        x = inputs[-1]
        if self.connection is Connection.DA:
            if self.projections is not None:
                base = None
                for proj, inp in zip(self.projections, inputs, strict=True):
                    term = proj(inp)
                    base = term if base is None else base + term
            else:
                base = self.shortcut(x) if self.shortcut is not None else x
            assert base is not None
            if self.weights is not None:
                return self._dense(x, base)
            s = base
            for i in range(len(self.branches)):
                s = s + self._branch(i, x if i == 0 else s)
            return s
        for i in range(len(self.branches)):
            y = self._branch(i, x)
            sc = self.shortcut(x) if (i == 0 and self.shortcut is not None) else x
            if self.connection is Connection.SPIKING:
                assert self.post is not None
                x = self.post[i](sc + y)
            elif self.connection is Connection.SEW_IAND:
                x = sc * (1.0 - y)
            else:  # sew_add, membrane
                x = sc + y
        return x

    def _dense(self, x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """Learnable DA: s_l = base + sum_k alpha_{l,k} y_k, y_1 = F_1(x), y_l = F_l(s_{l-1})."""
        assert self.weights is not None
        stash, ys, s = GradStash(), [], base
        whole = self.policy in ("block", "block_time")
        n = len(self.branches)
        for i in range(n):
            if i == 0:
                y = self._branch(0, x)
            elif whole:
                # the block input is re-aggregated in the recompute from the kept branch outputs, so a checkpoint
                # keeps nothing of its own (the ys are kept for the alphas' gradients anyway)
                y = checkpointing.run(self._dense_branch(i, stash), base, *ys, policy=self.policy)
            else:
                y = self._branch(i, s)
            ys.append(y)
            if not whole or i == n - 1:  # under block the aggregates live inside the next block's checkpoint
                s = self.weights.aggregate(base, ys, stash)
        return s


class SpikingResNet(nn.Module):
    """A spiking ResNet; ``forward(images [N, C, H, W])`` -> logits ``[T, N, num_classes]``."""

    def __init__(
        self,
        kind: str,
        layers: tuple[int, ...],
        connection: Connection,
        da: DASpec,
        neuron: NeuronSpec,
        num_classes: int = 1000,
        T: int = 4,
        width: int = 64,
        in_channels: int = 3,
        input_size: int = 224,
        zero_init_residual: bool = False,
        checkpointing: str = "none",
        spike_storage: str = "float",
        memory_budget_gb: float = 0.0,
        fuse_bn_neuron: bool | str = "auto",
        fuse_da: bool = False,
    ) -> None:
        super().__init__()
        self.T = T
        self.connection, self.da, self.neuron_spec = connection, da, neuron
        self.domain = domain_of(connection, da)
        self.spike_storage = spike_storage
        self.memory_budget_gb = memory_budget_gb
        small = input_size <= 64
        self.stem_conv = nn.Conv2d(
            in_channels, width, 3 if small else 7, 1 if small else 2, 1 if small else 3, bias=False
        )
        self.stem_bn = BatchNorm(width)
        self.stem_pool = None if small else nn.MaxPool2d(3, 2, 1)
        self.stem_neuron = make_neuron(neuron) if self.domain == "spike" else None

        stages, earlier, cin = [], [(width, 1)], width
        for j, blocks in enumerate(layers):
            planes = width * 2**j
            stage = Stage(kind, cin, planes, blocks, 1 if j == 0 else 2, connection, da, neuron, earlier)
            stages.append(stage)
            cin = planes * EXPANSION[kind]
            # aggregates seen by later stages: stage outputs 1..j (the stem only feeds stage 1)
            earlier = [(c, f * 2) for c, f in earlier[(1 if j == 0 else 0) :]] + [(cin, 2)]
        self.stages = nn.ModuleList(stages)
        # The head reads the stream directly (global average pool + FC per step), in both domains. For a
        # real-valued (membrane) stream a final neuron before the pool starved the classifier: ~1% firing at
        # initialisation, and a narrow DANet-18 fitted a batch ~10x more slowly in a quick check.
        self.fc = nn.Linear(cin, num_classes)
        self._init_weights(zero_init_residual)
        self.checkpointing = checkpointing
        for m in self.modules():
            if isinstance(m, ConvBN):
                m.spike_storage = spike_storage
        self.fuse_bn_neuron = fuse_bn_neuron
        self.fuse_da = fuse_da

    @property
    def fuse_da(self) -> bool:
        """Whether learnable DA's weighted sums run as Triton kernels on CUDA (``models._da_triton``)."""
        return self._fuse_da

    @fuse_da.setter
    def fuse_da(self, on: bool) -> None:
        self._fuse_da = bool(on)
        for m in self.modules():
            if isinstance(m, DenseWeights):
                m.fused = self._fuse_da

    @property
    def fuse_bn_neuron(self) -> bool | str:
        """Whether each BatchNorm that feeds an LIF / IF neuron runs with it as one op (``models.bn_neuron``):
        True, False, or "auto" (only where the op is measured faster than the pair: ``bn_neuron.faster_here``)."""
        return self._fuse_bn_neuron

    @fuse_bn_neuron.setter
    def fuse_bn_neuron(self, mode: bool | str) -> None:
        if not _fuse_mode_ok(mode):
            raise ValueError(f"fuse_bn_neuron={mode!r}: expected true, false or 'auto'")
        self._fuse_bn_neuron = mode
        for m in self.modules():
            if isinstance(m, (Branch, Projection)):
                m.fuse_bn_neuron = self._fuse_bn_neuron

    @property
    def checkpointing(self) -> str:
        return self._checkpointing

    @checkpointing.setter
    def checkpointing(self, policy: str) -> None:
        run = checkpointing.effective_policy(policy)
        self._checkpointing = policy
        # what runs: the policy itself, or for `auto` the choice made at the first training forward
        self.checkpointing_resolved: str | None = None if policy == "auto" else policy
        self.apply_policy(run)

    def apply_policy(self, run: str) -> None:
        """Run the concrete policy ``run`` from now on (``checkpointing`` keeps what was configured)."""
        for stage in self.stages:
            stage.policy = run
            for branch in stage.branches:
                branch.policy = run

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Branch):
                    nn.init.zeros_(m.units[-1].bn.weight)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``[N, C, H, W]`` (or a sequence ``[T, N, C, H, W]``) -> the stage-1 input ``[T, N, C', H', W']``."""
        if x.dim() == 4:
            # The static image is the same at every step: convolve and normalise once, repeat as a view.
            y = self.stem_bn(self.stem_conv(x))
            if self.stem_neuron is None:
                if self.stem_pool is not None:
                    y = self.stem_pool(y)
                return repeat_time(y, self.T)
            y = repeat_time(y, self.T)
        elif x.dim() == 5:
            y = _seq(self.stem_bn, _seq(self.stem_conv, x))
        else:
            raise ValueError(
                f"expected images [N, C, H, W] or a sequence [T, N, C, H, W], got {tuple(x.shape)}"
            )
        if self.stem_neuron is not None:
            y = self.stem_neuron(y)
        if self.stem_pool is not None:
            y = _seq(self.stem_pool, y)
        return y

    def features(self, x: torch.Tensor) -> torch.Tensor:
        aggregates = [self.stem(x)]
        for j, stage in enumerate(self.stages):
            out = stage(aggregates if stage.network else aggregates[-1:])
            aggregates = [out] if j == 0 else aggregates + [out]
        return aggregates[-1]

    def resolve_checkpointing(self, x: torch.Tensor) -> str:
        """Resolve ``checkpointing=auto`` for inputs like ``x`` now (the first training forward does it otherwise).

        It probes the model eagerly, so it is kept out of compiled graphs: under ``torch.compile(fullgraph=True)``
        call it once before the first compiled step (a plain ``torch.compile`` breaks the graph there once).
        """
        if self.checkpointing_resolved is None:
            self.checkpointing_resolved = "none"  # while probing (the probe calls forward)
            policy = checkpointing.resolve_auto(self, x)
            self.checkpointing_resolved = policy
            self.apply_policy(policy)
        return self.checkpointing_resolved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.checkpointing_resolved is None and self.training and torch.is_grad_enabled():
            if torch.compiler.is_compiling():
                # run outside the graph (fullgraph=True refuses here: resolve first). Wrapped only now: the
                # decorator imports torch._dynamo, which an eager user should not pay for at import.
                torch.compiler.disable(self.resolve_checkpointing)(x)
            else:
                self.resolve_checkpointing(x)
        return self.fc(spatial_mean(self.features(x)))


# --------------------------------------------------------------------------------------------- registry

REGISTRY: dict[str, tuple[str, int]] = {
    f"{family}{depth}": (family, depth) for family in FAMILIES for depth in DEPTHS
}


def model_names() -> list[str]:
    return list(REGISTRY)


def create_model(name: str, **overrides: Any) -> SpikingResNet:
    """Build a registered model; ``overrides`` are the model config's fields (see ``DEFAULTS``)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(REGISTRY)}")
    unknown = sorted(set(overrides) - set(DEFAULTS))
    if unknown:
        raise ValueError(
            f"create_model({name!r}): unknown override(s) {', '.join(unknown)}; valid: {', '.join(DEFAULTS)}"
        )
    cfg = {**DEFAULTS, **overrides}
    family, depth = REGISTRY[name]
    problems = []
    for key in ("num_classes", "T", "width", "in_channels", "input_size"):
        if not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 1:
            problems.append(f"{key}={cfg[key]!r}: expected a positive integer")
    if cfg["checkpointing"] not in checkpointing.POLICIES:
        problems.append(
            f"checkpointing={cfg['checkpointing']!r}: expected one of {', '.join(checkpointing.POLICIES)}"
        )
    if cfg["spike_storage"] not in checkpointing.SPIKE_STORAGE:
        problems.append(
            f"spike_storage={cfg['spike_storage']!r}: expected one of {', '.join(checkpointing.SPIKE_STORAGE)}"
        )
    if not _fuse_mode_ok(cfg["fuse_bn_neuron"]):
        problems.append(f"fuse_bn_neuron={cfg['fuse_bn_neuron']!r}: expected true, false or 'auto'")
    if not isinstance(cfg["fuse_da"], bool):
        problems.append(f"fuse_da={cfg['fuse_da']!r}: expected true or false")
    connection = FAMILIES[family]
    try:
        if cfg["connection"] not in (None, "default"):
            connection = Connection.parse(cfg["connection"])
    except ValueError as exc:
        problems.append(str(exc))
    specs: dict[str, Any] = {}
    for key, parse in (("da", DASpec.from_any), ("neuron", NeuronSpec.from_any)):
        try:
            specs[key] = parse(cfg[key])
        except (TypeError, ValueError) as exc:
            problems.append(str(exc))
    if problems:
        raise ValueError(f"create_model({name!r}): " + "; ".join(problems))
    kind, layers = DEPTHS[depth]
    return SpikingResNet(
        kind,
        layers,
        connection,
        specs["da"],
        specs["neuron"],
        num_classes=cfg["num_classes"],
        T=cfg["T"],
        width=cfg["width"],
        in_channels=cfg["in_channels"],
        input_size=cfg["input_size"],
        zero_init_residual=bool(cfg["zero_init_residual"]),
        checkpointing=cfg["checkpointing"],
        spike_storage=cfg["spike_storage"],
        memory_budget_gb=float(cfg["memory_budget_gb"]),
        fuse_bn_neuron=cfg["fuse_bn_neuron"],
        fuse_da=cfg["fuse_da"],
    )
