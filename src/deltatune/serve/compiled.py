"""``deltatune serve --compile``: adapters on a ``torch.compile``'d base that load without recompiling.

The model holds ``--max-loaded`` fixed LoRA *slots* (``slot0``, ``slot1``, ...), built once from the first adapter
that is loaded (same layers, same task head), padded to rank ``--max-rank`` with ``prepare_for_hotswap`` and then
compiled. Loading an adapter afterwards is ``hotswap_adapter`` into a free slot (the registry evicts the least
recently used adapter first): tensors are copied in place, so no parameter, shape or attribute changes and the
compiled graphs stay valid. Requests name adapters; the engine passes each row's slot as ``adapter_names``.

An adapter that cannot be swapped in (not LoRA-style, rank above ``--max-rank``, a layer or head the slots lack)
is refused with the reason; serve it without ``--compile``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import check_positive_int
from ..errors import AdapterFileError, ConfigError, DeltatuneError
from ..io import load
from ..layers import BASE

SLOT = "slot"


class CompiledSlots:
    """Public adapter name -> slot of the compiled model; ``count`` slots of rank ``max_rank``."""

    def __init__(self, count: int, max_rank: int, backend: str = "inductor") -> None:
        check_positive_int("--max-rank", max_rank)
        self.count, self.max_rank, self.backend = count, max_rank, backend
        self.slots: dict[str, str] = {}  # adapter name -> slot name
        self.free: list[str] = []

    def slot_of(self, name: str) -> str:
        """The ``adapter_names`` entry for adapter ``name`` (the base stays ``__base__``)."""
        return name if name == BASE else self.slots[name]

    def load(self, base: Any, model: Any, name: str, folder: Path) -> Any:
        """Put adapter ``name`` (``folder``) into a free slot; builds and compiles the slots on the first call.
        Returns the ``DeltaModel``. A refused adapter changes nothing."""
        if model is None:
            return self._build(base, name, folder)
        if not self.free:
            raise ConfigError("no free slot in the compiled model; evict an adapter first")
        slot = self.free[0]
        try:
            model.hotswap_adapter(folder, slot)
        except DeltatuneError as error:
            raise AdapterFileError(f"adapter '{name}' cannot be hot-swapped into the compiled model ({error}); "
                                   f"serve it without --compile, or raise --max-rank") from None
        self.free.pop(0)
        self.slots[name] = slot
        return model

    def _build(self, base: Any, name: str, folder: Path) -> Any:
        """The slots, each a copy of the first adapter, padded to ``max_rank``; then ``base.compile()``."""
        names = [f"{SLOT}{i}" for i in range(self.count)]
        model = None
        try:
            for slot in names:
                model = load(model if model is not None else base, folder, name=slot, activate=False)
            model.prepare_for_hotswap(self.max_rank, names=names)
        except BaseException as error:
            if model is not None:
                model.unload(keep=[])
                model.restore_requires_grad()
            if isinstance(error, DeltatuneError):
                raise AdapterFileError(f"adapter '{name}' cannot be the template of the compiled model's slots "
                                       f"({error}); serve without --compile, or raise --max-rank") from None
            raise
        model.eval()
        base.compile(backend=self.backend)  # the base's forward (also what generate() calls); the slots are inside it
        self.slots[name], self.free = names[0], names[1:]
        return model

    def unload(self, name: str) -> None:
        """Free adapter ``name``'s slot (its weights stay until the next swap; no row names it any more)."""
        self.free.append(self.slots.pop(name))
