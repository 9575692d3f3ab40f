"""Cost ledger: tokens in/out per model, a configurable price table, and a budget stop.

With `path`, the ledger carries the usage of earlier runs: it loads the file when created and rewrites
it atomically after every billed request, so `max_cost` bounds the spend of all runs together, a
killed one included. A budget needs a price for the model: `reserve` raises UnknownPrice otherwise.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

# USD per 1M tokens (input, output) for synchronous calls; the Batch API bills half of this.
DEFAULT_PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o-2024-11-20": (2.50, 10.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-2024-05-13": (5.00, 15.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o-mini-2024-07-18": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4-turbo": (10.00, 30.00),
}
BATCH_DISCOUNT = 0.5
log = logging.getLogger(__name__)


class BudgetExceeded(RuntimeError):
    """The next request could push the spend past --max-cost; the run stops cleanly."""


class UnknownPrice(ValueError):
    """A budget was set for a model the price table does not know."""


def load_prices(path: str | Path | None) -> dict[str, tuple[float, float]]:
    """Defaults, overridden by a JSON file `{"model": [input_per_1M, output_per_1M], ...}`."""
    prices = dict(DEFAULT_PRICES)
    if path:
        raw = json.loads(Path(path).read_text())
        for model, pair in raw.items():
            if not (isinstance(pair, list | tuple) and len(pair) == 2):
                raise ValueError(f"{path}: price for {model!r} must be [input_per_1M, output_per_1M]")
            prices[model] = (float(pair[0]), float(pair[1]))
    return prices


@dataclass
class ModelUsage:
    requests: int = 0
    cached: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0


@dataclass
class CostLedger:
    """Accumulates usage; `reserve` refuses a request whose worst case would break the budget.

    `per_model` is this run's usage; `earlier` is what `path` held when the ledger was created.
    """

    prices: dict[str, tuple[float, float]] = field(default_factory=lambda: dict(DEFAULT_PRICES))
    max_cost: float | None = None
    per_model: dict[str, ModelUsage] = field(default_factory=dict)
    reserved: float = 0.0
    path: str | Path | None = None
    earlier: dict[str, ModelUsage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._unpriced_warned: set[str] = set()
        if self.path is not None and Path(self.path).exists():
            try:
                raw = json.loads(Path(self.path).read_text())
                self.earlier = {m: ModelUsage(**u) for m, u in raw["models"].items()}
            except (ValueError, KeyError, TypeError) as err:
                raise ValueError(f"cannot read the cost ledger {self.path}: {err}") from err

    def require_price(self, model: str) -> None:
        """Raise UnknownPrice unless the price table has `model`."""
        if model not in self.prices:
            raise UnknownPrice(
                f"no price for model {model!r}, so a cost budget cannot be kept: give its USD per 1M "
                "input and output tokens (instit-annotate --price-in X --price-out Y, or --prices FILE "
                'with {"model": [in, out]})')

    def price(self, model: str, input_tokens: int, output_tokens: int, batch: bool = False) -> float:
        if model not in self.prices and model not in self._unpriced_warned:
            self._unpriced_warned.add(model)
            log.warning("no price for model %r: its cost is counted as $0", model)
        pin, pout = self.prices.get(model, (0.0, 0.0))
        cost = (input_tokens * pin + output_tokens * pout) / 1e6
        return cost * BATCH_DISCOUNT if batch else cost

    @property
    def run_cost(self) -> float:
        """USD spent by this run."""
        return sum(u.cost for u in self.per_model.values())

    @property
    def total_cost(self) -> float:
        """USD spent by this run and the earlier runs recorded in `path` (what `max_cost` bounds)."""
        return self.run_cost + sum(u.cost for u in self.earlier.values())

    def reserve(self, model: str, est_in: int, max_out: int, batch: bool = False) -> float:
        """Book the worst-case cost of a request before sending it; raises BudgetExceeded."""
        if self.max_cost is not None:
            self.require_price(model)
        worst = self.price(model, est_in, max_out, batch)
        if self.max_cost is not None and self.total_cost + self.reserved + worst > self.max_cost:
            raise BudgetExceeded(f"spent ${self.total_cost:.4f} (+${self.reserved:.4f} in flight); the next "
                                 f"request may cost up to ${worst:.4f}, over --max-cost ${self.max_cost:.4f}")
        self.reserved += worst
        return worst

    def unreserve(self, amount: float) -> None:
        self.reserved = max(0.0, self.reserved - amount)

    def record(self, model: str, input_tokens: int, output_tokens: int, *, cached: bool = False,
               batch: bool = False) -> None:
        usage = self.per_model.setdefault(model, ModelUsage())
        if cached:
            usage.cached += 1
            return
        usage.requests += 1
        usage.input_tokens += input_tokens
        usage.output_tokens += output_tokens
        usage.cost += self.price(model, input_tokens, output_tokens, batch)
        if self.path is not None:
            self.save()

    def totals(self) -> dict[str, ModelUsage]:
        """Usage per model over this run and the earlier ones."""
        out = {m: ModelUsage(**asdict(u)) for m, u in self.earlier.items()}
        for m, u in self.per_model.items():
            t = out.setdefault(m, ModelUsage())
            for k, v in asdict(u).items():
                setattr(t, k, getattr(t, k) + v)
        return out

    def save(self) -> None:
        """Write the totals to `path` (temp file + rename, so a kill never leaves it torn)."""
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"total_cost_usd": self.total_cost,
                                   "models": {m: asdict(u) for m, u in self.totals().items()}}, indent=1))
        os.replace(tmp, path)

    def summary(self) -> dict:
        return {"total_cost_usd": round(self.total_cost, 6), "run_cost_usd": round(self.run_cost, 6),
                "models": {m: vars(u) | {"cost": round(u.cost, 6)} for m, u in self.totals().items()}}
