"""Whether the Hugging Face hub can be used, found out in a second instead of after minutes of work
or download retries: the libraries' offline switches, the local caches, one quick request.

Used for hub model ids (:func:`safesteer.model_source.check_hub`) and for ``--data-source hub``
(:func:`check_data_hub`). Imports nothing heavy: a library is imported only to look at its cache.
"""

from __future__ import annotations

import importlib.util
import os
import urllib.error
import urllib.request
from pathlib import Path

from safesteer.errors import SafesteerError

_TRUE = ("1", "true", "yes", "on")
PROBE_S = 5.0
OFFLINE_DATA = "use the default --data-source offline (the pinned PyPI wheels, no network)"


def hub_is_offline(*switches: str) -> bool:
    """Whether the user has told the Hugging Face libraries not to use the network (``switches``:
    a library's own variables besides the hub's)."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", *switches))


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s config is in the local Hugging Face cache (loadable without network)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def unreachable(path: str) -> str | None:
    """Why the hub did not answer one request for ``path`` within :data:`PROBE_S` seconds; None
    when it answered, whatever the status (a missing or gated repository is reported by the
    library that loads it)."""
    try:
        urllib.request.urlopen(urllib.request.Request(f"{hub_endpoint()}{path}", method="HEAD"),
                               timeout=PROBE_S).close()
    except urllib.error.HTTPError:
        return None
    except (OSError, ValueError) as error:
        return str(getattr(error, "reason", error))
    return None


def _datasets_cache() -> Path:
    from datasets import config  # only with the hub switched off: the import takes a second

    return Path(config.HF_DATASETS_CACHE)


def check_data_hub() -> None:
    """Fail now, in one line, where ``--data-source hub`` would fail at its first dataset, after
    the work before it: without the ``datasets`` package, with the hub switched off and nothing in
    the datasets cache, or when the hub does not answer one quick request."""
    if importlib.util.find_spec("datasets") is None:
        raise SafesteerError("--data-source hub needs the 'datasets' package (pip install datasets); "
                             f"or {OFFLINE_DATA}")
    if hub_is_offline("HF_DATASETS_OFFLINE"):
        cache = _datasets_cache()
        if not cache.is_dir() or not any(cache.iterdir()):
            raise SafesteerError("--data-source hub: the Hugging Face libraries are offline (HF_HUB_OFFLINE "
                                 f"or HF_DATASETS_OFFLINE) and no dataset is cached in {cache}; "
                                 f"{OFFLINE_DATA}, or unset that variable to download them")
        return
    reason = unreachable("/api/datasets")
    if reason is not None:
        raise SafesteerError(f"--data-source hub: cannot reach the Hugging Face hub at {hub_endpoint()} "
                             f"({reason}); {OFFLINE_DATA}, or set HF_HUB_OFFLINE=1 to read datasets "
                             "cached earlier")
