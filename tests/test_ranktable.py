"""The HCCL rank table: from the pod annotation (also through the real kubernetes client against a
local API endpoint), from hccn.conf, from RANK_TABLE_FILE, and the order between them."""
import json
import threading
import time

import pytest
from pod_api import ANNOTATION_VALUE, FakeApiServer

from hrnet.errors import HrnetError
from hrnet.runtime import ranktable

HCCN_CONF = """\
address_0=192.168.100.101
netmask_0=255.255.255.0
address_1=192.168.101.101
netmask_1=255.255.255.0
address_2=192.168.102.101
address_3=192.168.103.101
"""


def _all_strings(obj):
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _all_strings(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_all_strings(v) for v in obj)
    return isinstance(obj, str)


def test_from_annotation_builds_v1_table_with_string_values_in_chip_order():
    table = ranktable.from_annotation(json.dumps(ANNOTATION_VALUE))
    assert table == {
        "status": "completed",
        "version": "1.0",
        "server_count": "1",
        "server_list": [{
            "server_id": "10.0.0.7",
            "device": [
                {"device_id": "4", "device_ip": "192.168.100.4", "rank_id": "0"},
                {"device_id": "5", "device_ip": "192.168.101.5", "rank_id": "1"},
            ],
        }],
    }
    assert _all_strings(table)
    assert ranktable.validate_rank_table(table) is table
    assert ranktable.rank_size(table) == 2


def test_from_annotation_takes_the_first_nproc_chips_and_refuses_more():
    table = ranktable.from_annotation(ANNOTATION_VALUE, nproc=1)
    assert table["server_list"][0]["device"] == [{"device_id": "4", "device_ip": "192.168.100.4", "rank_id": "0"}]
    with pytest.raises(HrnetError, match="4 process.*only 2 device"):
        ranktable.from_annotation(ANNOTATION_VALUE, nproc=4)


@pytest.mark.parametrize("value, message", [
    ("{not json", "not valid JSON"),
    (json.dumps({"server_id": "1.2.3.4"}), "no 'devices' list"),
    (json.dumps({"devices": [{"device_id": "0"}]}), "device_id and device_ip"),
    (json.dumps({"devices": [{"device_id": "0", "device_ip": "not-an-ip"}]}), "not an IP address"),
    (json.dumps({"devices": [{"device_id": "x", "device_ip": "1.2.3.4"}]}), "not a number"),
    (json.dumps({"devices": [{"device_id": "1", "device_ip": "1.2.3.4"},
                             {"device_id": "1", "device_ip": "1.2.3.5"}]}), "appears twice"),
])
def test_bad_annotation_is_a_clear_error(value, message):
    with pytest.raises(HrnetError, match=message):
        ranktable.from_annotation(value)


def test_hccn_conf_gives_the_device_ips_of_the_visible_chips(tmp_path):
    assert ranktable.parse_hccn_conf(HCCN_CONF) == {
        0: "192.168.100.101", 1: "192.168.101.101", 2: "192.168.102.101", 3: "192.168.103.101"}
    conf = tmp_path / "hccn.conf"
    conf.write_text(HCCN_CONF)
    table = ranktable.from_hccn_conf([2, 3], str(conf), server_id="10.1.1.1")
    assert table["server_list"] == [{"server_id": "10.1.1.1", "device": [
        {"device_id": "2", "device_ip": "192.168.102.101", "rank_id": "0"},
        {"device_id": "3", "device_ip": "192.168.103.101", "rank_id": "1"},
    ]}]
    assert _all_strings(table)
    # Chips beyond nproc need no address.
    assert ranktable.rank_size(ranktable.from_hccn_conf([0, 7], str(conf), server_id="x", nproc=1)) == 1
    with pytest.raises(HrnetError, match="no address_N line for device.* 7"):
        ranktable.from_hccn_conf([0, 7], str(conf))
    with pytest.raises(HrnetError, match="cannot read the device IPs from"):
        ranktable.from_hccn_conf([0], str(tmp_path / "missing.conf"))


@pytest.mark.parametrize("value, ids", [
    ("0,1,2,3", [0, 1, 2, 3]),
    ("4-7", [4, 5, 6, 7]),
    ("Ascend910-2, Ascend910-5", [2, 5]),
    ("", []),
    (None, []),
])
def test_visible_devices(value, ids):
    assert ranktable.visible_devices(value) == ids


def test_visible_devices_rejects_garbage():
    with pytest.raises(HrnetError, match="ASCEND_VISIBLE_DEVICES"):
        ranktable.visible_devices("0,gpu1")


def test_resolve_from_env_uses_visible_devices_and_hccn_conf(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text(HCCN_CONF)
    env = {"ASCEND_VISIBLE_DEVICES": "1,2,3", "SERVER_ID": "10.2.2.2"}
    table, source = ranktable.resolve_rank_table(2, env=env, hccn_conf=str(conf))
    assert source == "hccn.conf"
    assert table["server_list"][0]["server_id"] == "10.2.2.2"
    assert [(d["device_id"], d["rank_id"]) for d in ranktable.local_ranks(table, env)] == [("1", "0"), ("2", "1")]
    with pytest.raises(HrnetError, match="no HCCL rank table"):
        ranktable.resolve_rank_table(2, env={}, hccn_conf=str(conf))


def _write(path, table):
    path.write_text(json.dumps(table))
    return str(path)


def test_rank_table_file_comes_first_and_must_match_nproc(tmp_path):
    table = ranktable.build_rank_table([(0, "192.168.100.101"), (1, "192.168.101.101")], "10.0.0.1")
    path = _write(tmp_path / "hccl.json", table)
    # RANK_TABLE_FILE wins over ASCEND_VISIBLE_DEVICES and a Kubernetes environment.
    env = {"RANK_TABLE_FILE": path, "ASCEND_VISIBLE_DEVICES": "4,5", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    assert ranktable.resolve_rank_table(2, env=env) == (table, "file")
    with pytest.raises(HrnetError, match="lists 2 device.*4 process"):
        ranktable.resolve_rank_table(4, env=env)


def test_rank_table_file_is_reread_until_completed(tmp_path):
    table = ranktable.build_rank_table([(0, "192.168.100.101")], "10.0.0.1")
    path = _write(tmp_path / "hccl.json", {"status": "initializing"})

    def complete_later():
        time.sleep(0.3)
        ranktable.write_rank_table(table, path)

    writer = threading.Thread(target=complete_later)
    writer.start()
    try:
        assert ranktable.read_rank_table_file(path, timeout=10, interval=0.05) == table
    finally:
        writer.join()
    _write(tmp_path / "hccl.json", {"status": "initializing"})
    with pytest.raises(HrnetError, match="still has status 'initializing'"):
        ranktable.read_rank_table_file(path, timeout=0.2, interval=0.05)


@pytest.mark.parametrize("table, message", [
    ({"status": "completed", "group_list": []}, "no 'server_list'"),
    ({"server_list": [{"server_id": "a", "device": [{"device_id": "0", "device_ip": "1.1.1.1"}]}]}, "rank_id"),
    ({"server_list": [{"server_id": "a", "device": [{"device_id": "0", "device_ip": "1.1.1.1", "rank_id": "1"}]}]},
     "rank ids must be 0..0"),
])
def test_bad_rank_table_file_is_a_clear_error(tmp_path, table, message):
    path = _write(tmp_path / "hccl.json", table)
    with pytest.raises(HrnetError, match=message):
        ranktable.read_rank_table_file(path, timeout=0)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(HrnetError, match="not valid JSON"):
        ranktable.read_rank_table_file(str(tmp_path / "broken.json"), timeout=0)


def test_multi_server_table_picks_this_server_by_its_ip():
    table = {"status": "completed", "version": "1.0", "server_count": "2", "server_list": [
        {"server_id": "10.0.0.1", "device": [{"device_id": str(i), "device_ip": f"192.168.10{i}.1",
                                              "rank_id": str(i)} for i in range(2)]},
        {"server_id": "10.0.0.2", "device": [{"device_id": str(i), "device_ip": f"192.168.10{i}.2",
                                              "rank_id": str(i + 2)} for i in range(2)]},
    ]}
    ranktable.validate_rank_table(table)
    assert ranktable.rank_size(table) == 4
    local = ranktable.local_ranks(table, {"XDL_IP": "10.0.0.2"})
    assert [d["rank_id"] for d in local] == ["2", "3"]
    with pytest.raises(HrnetError, match="set SERVER_ID"):
        ranktable.local_ranks(table, {})


# ----------------------------------------------------------------------------- the Kubernetes API

def test_annotation_is_polled_through_the_kubernetes_client_until_it_appears():
    with FakeApiServer(annotate_after=3) as api:
        value = ranktable.read_pod_annotation("train-0", "kubeflow", configuration=api.configuration(),
                                              timeout=10, interval=0.05)
        assert api.reads == 3
    assert json.loads(value) == ANNOTATION_VALUE


def test_resolve_reads_the_annotation_inside_kubernetes(tmp_path):
    env = {"HOSTNAME": "train-0", "POD_NAMESPACE": "kubeflow", "KUBERNETES_SERVICE_HOST": "10.96.0.1",
           "ASCEND_VISIBLE_DEVICES": "4,5"}
    with FakeApiServer(annotate_after=2) as api:
        from kubernetes import client

        api_client = client.ApiClient(api.configuration())
        table, source = ranktable.resolve_rank_table(2, env=env, api_client=api_client, interval=0.05,
                                                     hccn_conf=str(tmp_path / "unused"))
        assert api.reads == 2
    assert source == "annotation"
    assert table == ranktable.from_annotation(ANNOTATION_VALUE)


def test_annotation_that_never_appears_times_out_clearly():
    with FakeApiServer(annotate_after=None) as api:
        with pytest.raises(HrnetError, match=r"no ascend.kubectl.kubernetes.io/ascend-910-configuration annotation "
                                             r"on pod kubeflow/train-0 after 0 s \(\d+ polls"):
            ranktable.read_pod_annotation("train-0", "kubeflow", configuration=api.configuration(),
                                          timeout=0.3, interval=0.05)
        assert api.reads >= 2


@pytest.mark.parametrize("status, message", [(403, "service account needs 'get' on pods"), (404, "not found")])
def test_api_refusals_are_clear_errors_without_polling(status, message):
    with FakeApiServer(status=status if status != 404 else 200) as api:
        name = "train-0" if status != 404 else "someone-else"
        with pytest.raises(HrnetError, match=message):
            ranktable.read_pod_annotation(name, "kubeflow", configuration=api.configuration(),
                                          timeout=10, interval=0.05)
        assert api.reads == (1 if status == 403 else 0)


def test_unreachable_api_server_times_out_with_the_last_problem():
    from kubernetes import client

    config = client.Configuration()
    with FakeApiServer() as api:
        config.host = api.configuration().host  # a port that is closed once the server stops
    with pytest.raises(HrnetError, match="last: .*(Connection|refused)"):
        ranktable.read_pod_annotation("train-0", "kubeflow", configuration=config, timeout=0.3, interval=0.05)


def test_outside_a_cluster_the_in_cluster_config_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(HrnetError, match="cannot reach the Kubernetes API"):
        ranktable.read_pod_annotation("train-0", "kubeflow", timeout=0.1)


def test_resolve_reads_the_annotation_from_a_downward_api_file_without_api_access(tmp_path):
    """The kubelet's downward-API file (key="Go-quoted value" lines, rewritten when the
    annotations change): the device plugin's annotation appears a moment after the start."""
    path = tmp_path / "annotations"
    path.write_text('kubernetes.io/config.seen="2026-12-02T03:00:00.0Z"\nkubernetes.io/config.source="api"\n')

    def annotate():
        time.sleep(0.3)
        quoted = json.dumps(json.dumps(ANNOTATION_VALUE))  # Go's %q of ASCII JSON reads the same
        (tmp_path / "new").write_text(f'{ranktable.ANNOTATION}={quoted}\nkubernetes.io/config.seen="x"\n')
        (tmp_path / "new").replace(path)

    threading.Thread(target=annotate, daemon=True).start()
    env = {"ASCEND_ANNOTATIONS_FILE": str(path), "ASCEND_VISIBLE_DEVICES": "4,5"}
    table, source = ranktable.resolve_rank_table(2, env=env, interval=0.05, timeout=10,
                                                 hccn_conf=str(tmp_path / "unused"))
    assert source == "annotation" and table == ranktable.from_annotation(ANNOTATION_VALUE)
    with pytest.raises(HrnetError, match="does not exist: mount the pod's metadata.annotations"):
        ranktable.resolve_rank_table(2, env={"ASCEND_ANNOTATIONS_FILE": str(tmp_path / "none")})
    path.write_text('kubernetes.io/config.seen="x"\n')
    with pytest.raises(HrnetError, match="no ascend.kubectl.kubernetes.io/ascend-910-configuration annotation in"):
        ranktable.resolve_rank_table(2, env=env, interval=0.05, timeout=0.2)
