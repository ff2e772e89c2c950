"""The HCCL rank table (v1.0) that tells each Ascend process who its peers are.

HCCL reads a JSON file naming every chip of the job with its device IP and rank::

    {"status": "completed", "version": "1.0", "server_count": "1",
     "server_list": [{"server_id": "10.0.0.5",
                      "device": [{"device_id": "0", "device_ip": "192.168.100.101", "rank_id": "0"}]}]}

(every value a string). :func:`resolve_rank_table` finds it, in this order:

1. ``RANK_TABLE_FILE`` when set (e.g. Volcano's hccl-controller ConfigMap, which says
   ``"status": "initializing"`` until it is ready, so the file is re-read until completed);
2. inside Kubernetes, the pod annotation ``ascend.kubectl.kubernetes.io/ascend-910-configuration``
   that the Ascend device plugin writes shortly *after* the container starts (polled until it
   appears): from a downward-API volume of the pod's annotations when ``ASCEND_ANNOTATIONS_FILE``
   names one (the kubelet rewrites it when annotations change, and the pod needs no API
   access at all), else through the Kubernetes API (the service account needs 'get' on pods);
3. ``ASCEND_VISIBLE_DEVICES`` plus the node's ``/etc/hccn.conf`` (``address_N=<device ip>``).

Pure Python on purpose: the launcher imports this before any TensorFlow exists, and the
``kubernetes`` package is imported only on the annotation path.
"""
import ipaddress
import json
import logging
import os
import re
import socket
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from hrnet.errors import HrnetError
from hrnet.fileio import atomic_write

log = logging.getLogger(__name__)

ANNOTATION = "ascend.kubectl.kubernetes.io/ascend-910-configuration"
HCCN_CONF = "/etc/hccn.conf"
NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
# Environment variables that may carry this node's IP (the rank table's server_id):
# SERVER_ID is ours, XDL_IP is what MindX DL job templates set from status.hostIP.
SERVER_ID_ENV = ("SERVER_ID", "XDL_IP", "NODE_IP", "HOST_IP")


# ----------------------------------------------------------------------------- building

def build_rank_table(devices: Sequence[Tuple[Any, Any]], server_id: str) -> Dict[str, Any]:
    """A one-server v1.0 rank table; ranks follow the order of ``devices`` ((device_id, device_ip) pairs)."""
    if not devices:
        raise HrnetError("cannot build an HCCL rank table without devices")
    seen = set()
    entries = []
    for rank, (device_id, device_ip) in enumerate(devices):
        device_id = _device_id(device_id, "device list")
        if device_id in seen:
            raise HrnetError(f"device {device_id} appears twice in the device list")
        seen.add(device_id)
        entries.append({"device_id": str(device_id), "device_ip": _ip(device_ip, f"device {device_id}"),
                        "rank_id": str(rank)})
    return {
        "status": "completed",
        "version": "1.0",
        "server_count": "1",
        "server_list": [{"server_id": str(server_id), "device": entries}],
    }


def from_annotation(value: Any, nproc: Optional[int] = None) -> Dict[str, Any]:
    """Rank table from the device plugin's pod annotation (a JSON string or its parsed dict).

    ``{"pod_name": "..", "server_id": "<node ip>", "devices": [{"device_id": "3", "device_ip": ".."}]}``;
    ranks go to the chips in ascending chip id, and with ``nproc`` only the first ``nproc`` chips are used.
    """
    if isinstance(value, (str, bytes)):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise HrnetError(f"pod annotation {ANNOTATION} is not valid JSON: {e}") from None
    if not isinstance(value, dict) or not isinstance(value.get("devices"), list) or not value["devices"]:
        raise HrnetError(f"pod annotation {ANNOTATION} has no 'devices' list: {value!r}")
    pairs = []
    for d in value["devices"]:
        if not isinstance(d, dict) or "device_id" not in d or "device_ip" not in d:
            raise HrnetError(f"pod annotation {ANNOTATION}: each device needs device_id and device_ip, got {d!r}")
        pairs.append((_device_id(d["device_id"], "pod annotation"), d["device_ip"]))
    pairs.sort()
    server_id = value.get("server_id") or _default_server_id(os.environ)
    return build_rank_table(_first(pairs, nproc, f"the pod annotation {ANNOTATION}"), server_id)


def parse_hccn_conf(text: str) -> Dict[int, str]:
    """``{chip id: device ip}`` from the lines ``address_N=IP`` of an hccn.conf."""
    addresses = {}
    for line in text.splitlines():
        m = re.match(r"\s*address_(\d+)\s*=\s*(\S+)\s*$", line)
        if m:
            addresses[int(m.group(1))] = m.group(2)
    return addresses


def from_hccn_conf(device_ids: Sequence[int], path: str = HCCN_CONF, server_id: Optional[str] = None,
                   nproc: Optional[int] = None) -> Dict[str, Any]:
    """Rank table for the chips ``device_ids`` (e.g. ASCEND_VISIBLE_DEVICES) with their IPs from hccn.conf."""
    device_ids = [d for d, _ in _first([(d, None) for d in device_ids], nproc, "ASCEND_VISIBLE_DEVICES")]
    try:
        with open(path) as f:
            addresses = parse_hccn_conf(f.read())
    except OSError as e:
        raise HrnetError(f"cannot read the device IPs from {path} ({e}); set RANK_TABLE_FILE instead") from None
    missing = [d for d in device_ids if d not in addresses]
    if missing:
        listed = ", ".join(map(str, sorted(addresses))) or "none"
        wanted = ", ".join(map(str, missing))
        raise HrnetError(f"{path} has no address_N line for device(s) {wanted} (it lists {listed})")
    pairs = [(d, addresses[d]) for d in device_ids]
    return build_rank_table(pairs, server_id or _default_server_id(os.environ))


# ----------------------------------------------------------------------------- reading

def validate_rank_table(table: Any, where: str = "rank table") -> Dict[str, Any]:
    """Check the parts of a v1.0 rank table that the launcher and HCCL rely on; returns it."""
    if not isinstance(table, dict) or not isinstance(table.get("server_list"), list) or not table["server_list"]:
        raise HrnetError(f"{where} has no 'server_list' (only the v1.0 rank table format is supported)")
    ranks = set()
    for server in table["server_list"]:
        if not isinstance(server, dict) or not isinstance(server.get("device"), list) or not server["device"]:
            raise HrnetError(f"{where}: a server_list entry has no 'device' list: {server!r}")
        for d in server["device"]:
            if not isinstance(d, dict) or not {"device_id", "device_ip", "rank_id"} <= set(d):
                raise HrnetError(f"{where}: each device needs device_id, device_ip and rank_id, got {d!r}")
            _device_id(d["device_id"], where)
            rank = _device_id(d["rank_id"], where)
            if rank in ranks:
                raise HrnetError(f"{where}: rank_id {rank} appears twice")
            ranks.add(rank)
    if ranks != set(range(len(ranks))):
        raise HrnetError(f"{where}: rank ids must be 0..{len(ranks) - 1}, got {sorted(ranks)}")
    return table


def read_rank_table_file(path: str, timeout: float = 300.0, interval: float = 2.0) -> Dict[str, Any]:
    """Read RANK_TABLE_FILE, waiting while its status is not "completed" (hccl-controller fills it in late)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(path) as f:
                table = json.load(f)
        except OSError as e:
            raise HrnetError(f"cannot read RANK_TABLE_FILE {path}: {e}") from None
        except ValueError as e:
            raise HrnetError(f"RANK_TABLE_FILE {path} is not valid JSON: {e}") from None
        status = table.get("status", "completed") if isinstance(table, dict) else None
        if status == "completed":
            return validate_rank_table(table, f"RANK_TABLE_FILE {path}")
        if time.monotonic() >= deadline:
            raise HrnetError(f"RANK_TABLE_FILE {path} still has status {status!r} after {timeout:.0f} s")
        log.info("waiting for RANK_TABLE_FILE %s (status %r)", path, status)
        time.sleep(interval)


def parse_annotations_file(text: str) -> Dict[str, str]:
    """The annotations of a downward-API volume file: one ``key="value"`` line each, the value
    quoted as Go's strconv.Quote does (which Python's string literal syntax reads)."""
    import ast

    found = {}
    for line in text.splitlines():
        key, sep, quoted = line.partition("=")
        if not sep or not quoted.startswith('"'):
            continue
        try:
            found[key] = ast.literal_eval(quoted)
        except (ValueError, SyntaxError):
            raise HrnetError(f"unreadable line in the pod's annotations file: {line[:120]!r}") from None
    return found


def read_annotations_file(path: str, timeout: float = 120.0, interval: float = 2.0,
                          annotation: str = ANNOTATION) -> str:
    """The value of ``annotation`` in a downward-API annotations file, polled until it appears."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        try:
            with open(path) as f:
                value = parse_annotations_file(f.read()).get(annotation)
        except FileNotFoundError:
            raise HrnetError(f"ASCEND_ANNOTATIONS_FILE {path} does not exist: mount the pod's metadata.annotations "
                             "there with a downwardAPI volume") from None
        if value:
            log.info("read the rank table annotation from %s after %d poll(s)", path, polls)
            return value
        if time.monotonic() + interval > deadline:
            raise HrnetError(f"no {annotation} annotation in {path} after {timeout:.0f} s ({polls} polls); is the "
                             "Ascend device plugin running? Else set RANK_TABLE_FILE")
        time.sleep(interval)


def read_pod_annotation(pod_name: Optional[str] = None, namespace: Optional[str] = None, api_client: Any = None,
                        configuration: Any = None, timeout: float = 120.0, interval: float = 2.0,
                        annotation: str = ANNOTATION) -> str:
    """The value of ``annotation`` on this pod, polled through the Kubernetes API until it appears.

    The client comes from ``api_client``, else ``configuration`` (a kubernetes.client.Configuration),
    else the in-cluster service account. The pod is HOSTNAME (or POD_NAME) in POD_NAMESPACE (or the
    service account's namespace).
    """
    from kubernetes import client as k8s  # lazy: only this path needs it
    from kubernetes.client.rest import ApiException

    pod_name = pod_name or os.environ.get("POD_NAME") or os.environ.get("HOSTNAME") or socket.gethostname()
    namespace = namespace or pod_namespace()
    if api_client is None:
        if configuration is None:
            from kubernetes import config as k8s_config

            try:
                k8s_config.load_incluster_config()
            except k8s_config.ConfigException as e:
                raise HrnetError(f"cannot reach the Kubernetes API to read the rank table annotation: {e}") from None
            api_client = k8s.ApiClient()
        else:
            api_client = k8s.ApiClient(configuration)
    api = k8s.CoreV1Api(api_client)
    where = f"pod {namespace}/{pod_name}"
    deadline = time.monotonic() + timeout
    last_problem = "annotation not set yet"
    polls = 0
    while True:
        polls += 1
        try:
            pod = api.read_namespaced_pod(pod_name, namespace, _request_timeout=min(10.0, max(timeout, 1.0)))
            value = (pod.metadata.annotations or {}).get(annotation)
            if value:
                log.info("read the rank table annotation of %s after %d poll(s)", where, polls)
                return value
            last_problem = "annotation not set yet"
        except ApiException as e:
            if e.status in (401, 403):
                raise HrnetError(f"not allowed to read {where} (HTTP {e.status}): the service account needs "
                                 "'get' on pods") from None
            if e.status == 404:
                raise HrnetError(f"{where} not found; set POD_NAME/POD_NAMESPACE or RANK_TABLE_FILE") from None
            last_problem = f"HTTP {e.status} {e.reason}"
        except Exception as e:  # connection refused, DNS, timeouts: the API server may come back
            last_problem = f"{type(e).__name__}: {e}"
        if time.monotonic() + interval > deadline:
            raise HrnetError(f"no {annotation} annotation on {where} after {timeout:.0f} s ({polls} polls; last: "
                             f"{last_problem}); is the Ascend device plugin running? Else set RANK_TABLE_FILE")
        time.sleep(interval)


def pod_namespace(env: Optional[Mapping[str, str]] = None) -> str:
    env = os.environ if env is None else env
    if env.get("POD_NAMESPACE"):
        return env["POD_NAMESPACE"]
    try:
        with open(NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def visible_devices(value: Optional[str]) -> List[int]:
    """Chip ids from ASCEND_VISIBLE_DEVICES: ``0,1,2``, ranges ``0-3`` and ``Ascend910-3`` names."""
    ids: List[int] = []
    for part in (value or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(?:Ascend\w*-)?(\d+)(?:-(\d+))?", part)
        if not m:
            raise HrnetError(f"cannot read ASCEND_VISIBLE_DEVICES={value!r}: {part!r} is not a chip id or range")
        first, last = int(m.group(1)), int(m.group(2) or m.group(1))
        ids.extend(i for i in range(first, last + 1) if i not in ids)
    return ids


def resolve_rank_table(nproc: int, env: Optional[Mapping[str, str]] = None, api_client: Any = None,
                       configuration: Any = None, hccn_conf: str = HCCN_CONF, timeout: float = 300.0,
                       interval: float = 2.0) -> Tuple[Dict[str, Any], str]:
    """The rank table for ``nproc`` processes on this server and where it came from.

    Returns ``(table, source)`` with source ``"file"``, ``"annotation"`` or ``"hccn.conf"``. A table from
    RANK_TABLE_FILE is used as it is (and must list ``nproc`` devices on this server); the other two
    are built for the first ``nproc`` chips.
    """
    env = os.environ if env is None else env
    path = env.get("RANK_TABLE_FILE")
    if path:
        table = read_rank_table_file(path, timeout=timeout, interval=interval)
        local = local_ranks(table, env)
        if len(local) != nproc:
            raise HrnetError(f"RANK_TABLE_FILE {path} lists {len(local)} device(s) on this server but {nproc} "
                             "process(es) were asked for")
        return table, "file"
    visible = visible_devices(env.get("ASCEND_VISIBLE_DEVICES"))
    annotations_file = env.get("ASCEND_ANNOTATIONS_FILE")
    if annotations_file or api_client is not None or configuration is not None or env.get("KUBERNETES_SERVICE_HOST"):
        if annotations_file:
            value = read_annotations_file(annotations_file, timeout=timeout, interval=interval)
        else:
            value = read_pod_annotation(namespace=pod_namespace(env), pod_name=env.get("POD_NAME") or
                                        env.get("HOSTNAME"), api_client=api_client, configuration=configuration,
                                        timeout=timeout, interval=interval)
        table = from_annotation(value, nproc=nproc)
        chips = [int(d["device_id"]) for d in table["server_list"][0]["device"]]
        if visible and not set(chips) <= set(visible):
            log.warning("the pod annotation names chips %s, ASCEND_VISIBLE_DEVICES=%s", chips, visible)
        return table, "annotation"
    if not visible:
        raise HrnetError("no HCCL rank table: set RANK_TABLE_FILE, run in a Kubernetes pod with the Ascend device "
                         f"plugin, or set ASCEND_VISIBLE_DEVICES (device IPs then come from {hccn_conf})")
    return from_hccn_conf(visible, hccn_conf, server_id=_default_server_id(env), nproc=nproc), "hccn.conf"


def local_ranks(table: Dict[str, Any], env: Optional[Mapping[str, str]] = None) -> List[Dict[str, str]]:
    """This server's devices (each with device_id, device_ip, rank_id), in rank order.

    With several servers (a multi-node Volcano job) this one is found by its IP in SERVER_ID / XDL_IP /
    NODE_IP / HOST_IP.
    """
    servers = table["server_list"]
    if len(servers) == 1:
        server = servers[0]
    else:
        env = os.environ if env is None else env
        ids = [env[k] for k in SERVER_ID_ENV if env.get(k)]
        matches = [s for s in servers if s.get("server_id") in ids]
        if len(matches) != 1:
            names = ", ".join(str(s.get("server_id")) for s in servers)
            raise HrnetError(f"the rank table lists {len(servers)} servers ({names}); set SERVER_ID to this "
                             "node's server_id")
        server = matches[0]
    return sorted(server["device"], key=lambda d: int(d["rank_id"]))


def rank_size(table: Dict[str, Any]) -> int:
    return sum(len(s["device"]) for s in table["server_list"])


def write_rank_table(table: Dict[str, Any], path: str) -> str:
    """Write the table atomically (HCCL must never read half a file); returns the path."""
    return atomic_write(path, json.dumps(table, indent=2))


# ----------------------------------------------------------------------------- helpers

def _device_id(value: Any, where: str) -> int:
    try:
        number = int(str(value).strip())
    except ValueError:
        raise HrnetError(f"{where}: {value!r} is not a number") from None
    if number < 0:
        raise HrnetError(f"{where}: {value!r} is negative")
    return number


def _ip(value: Any, where: str) -> str:
    try:
        return str(ipaddress.ip_address(str(value).strip()))
    except ValueError:
        raise HrnetError(f"{where}: device_ip {value!r} is not an IP address") from None


def _first(pairs: List[Tuple[int, Any]], nproc: Optional[int], source: str) -> List[Tuple[int, Any]]:
    if nproc is None:
        return pairs
    if nproc > len(pairs):
        raise HrnetError(f"{nproc} process(es) asked for but {source} lists only {len(pairs)} device(s)")
    return pairs[:nproc]


def _default_server_id(env: Mapping[str, str]) -> str:
    for key in SERVER_ID_ENV:
        if env.get(key):
            return env[key]
    # One-server tables only need a stable id; the host's address is what HCCL examples use.
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"
