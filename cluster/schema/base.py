"""What every model of the config shares: strictness, frozenness, the patterns of names."""

from pydantic import BaseModel, ConfigDict

MODEL_ID = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
ENV_VAR = r"^[A-Za-z_][A-Za-z0-9_]*$"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def reject_duplicates(what: str, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"duplicate {what} {name!r}")
        seen.add(name)
