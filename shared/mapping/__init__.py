"""The expert-machine mapping: which adapters the router's labels name, and which workers hold them.

:mod:`shared.mapping.schema` is the file's shape and the lookups on it, :mod:`shared.mapping.checks`
the rules that tie entries together, :mod:`shared.mapping.load` reading a file into a checked
:class:`MoleMapping`. Import the names from here.
"""

from shared.mapping.load import expand_env, load_mapping, parse_mapping
from shared.mapping.schema import (
    DEFAULT_WORKER_MAX_PIXELS,
    LOCAL_HOSTS,
    ROUTER_MODEL_NAME,
    WORKER_ID_PATTERN,
    AdapterSpec,
    CoordinatorSpec,
    DispatchPolicy,
    Engine,
    MoleMapping,
    RouterSpec,
    WorkerSpec,
    current_keys,
    discover_adapters,
    is_local_url,
    url_host,
    url_port,
)

__all__ = [
    "DEFAULT_WORKER_MAX_PIXELS",
    "LOCAL_HOSTS",
    "ROUTER_MODEL_NAME",
    "WORKER_ID_PATTERN",
    "AdapterSpec",
    "CoordinatorSpec",
    "DispatchPolicy",
    "Engine",
    "MoleMapping",
    "RouterSpec",
    "WorkerSpec",
    "current_keys",
    "discover_adapters",
    "expand_env",
    "is_local_url",
    "load_mapping",
    "parse_mapping",
    "url_host",
    "url_port",
]
