import pytest

from domubackup.core.config import check_domu_name, load_config, parse_config
from domubackup.core.errors import ConfigError, NotEligibleError, UsageError

BASE = 'dom0s = ["dom0a", "dom0b"]\n'


def parse(text, **kw):
    return parse_config(text, "/etc/db.toml", hostname=kw.pop("hostname", "dom0a"), default_uri="xen:///system", **kw)


def error_of(text):
    with pytest.raises(ConfigError) as e:
        parse(text)
    assert e.value.exit_code == 78
    return str(e.value)


def test_example_config_parses(fixtures):
    c = load_config(str(fixtures.parent / "conf" / "domubackup.toml"), hostname="dom0a")
    assert c.dom0s == ("dom0a", "dom0b")
    assert c.peers_for("web1") == ("dom0b",)
    assert c.defaults.rsync.options == ("-aHAX", "--numeric-ids", "--delete", "--sparse")
    assert c.defaults.rsync.compress is False


def test_defaults_and_peer_is_dom0s_minus_this_host():
    c = parse('dom0s = ["dom0a", "dom0b", "dom0c"]\n')
    assert c.this_host == "dom0a"
    assert c.peers_for("anything") == ("dom0b", "dom0c")
    assert c.defaults.libvirt_uri == "xen:///system"
    assert c.defaults.kpartx_separator == "p"
    assert c.state_dir == "/var/lib/domubackup"


def test_domu_section_overrides_global_and_nested_tables():
    c = parse(BASE + 'snapshot_size = "2G"\n[ssh]\nport = 2222\n'
              '[domu.db1]\nsnapshot_size = "20%ORIGIN"\nmounts = { vda1 = "/", vdb = "/srv/" }\n'
              '[domu.db1.ssh]\nuser = "backup"\n')
    db1 = c.settings_for("db1")
    assert db1.snapshot_size == "20%ORIGIN"
    assert db1.ssh.user == "backup" and db1.ssh.port == 2222
    assert db1.mounts == (("vda1", "/"), ("vdb", "/srv"))
    assert c.settings_for("other").snapshot_size == "2G"


@pytest.mark.parametrize("text, message", [
    ('dom0s = ["a"]\nport = = 2\n', "/etc/db.toml: not valid TOML: Invalid value (at line 2, column 8)"),
    (BASE + 'snapshot_sise = "1G"\n', "/etc/db.toml: snapshot_sise: unknown key (known: "),
    (BASE + "snapshot_size = 1\n", "/etc/db.toml: snapshot_size: expected a string, got 1"),
    (BASE + 'snapshot_size = "lots"\n', "/etc/db.toml: snapshot_size: expected a size like '1G', '512M' or '20%ORIGIN', got 'lots'"),
    ("state_dir = '/x'\n", "/etc/db.toml: dom0s: missing required key"),
    ('dom0s = "dom0a"\n', "/etc/db.toml: dom0s: expected a list of strings, got 'dom0a'"),
    (BASE + '[domu.web1]\npeers = ["dom0z"]\n', "/etc/db.toml: domu.web1.peers: peer 'dom0z' is not in dom0s ['dom0a', 'dom0b']"),
    (BASE + '[ssh]\nport = "22"\n', "/etc/db.toml: ssh.port: expected an integer, got '22'"),
    (BASE + '[rsync]\nio_timeout = -5\n', "/etc/db.toml: rsync.io_timeout: expected seconds >= 0, got -5"),
    (BASE + '[ssh]\nalive_interval = -1\n', "/etc/db.toml: ssh.alive_interval: expected seconds >= 0, got -1"),
    (BASE + '[rsync]\ncompress = "yes"\n', "/etc/db.toml: rsync.compress: expected true or false, got 'yes'"),
    (BASE + '[domu.web1]\nstate_dir = "/x"\n', "/etc/db.toml: domu.web1.state_dir: is a global key and cannot be set per DomU"),
    (BASE + 'consistency = "magic"\n', "/etc/db.toml: consistency: expected one of none, agent, hooks, hooks+agent, got 'magic'"),
    (BASE + '[domu.web1]\nmounts = { xvda1 = "var" }\n', "/etc/db.toml: domu.web1.mounts.xvda1: expected an absolute guest path, got 'var'"),
    (BASE + 'source_prefix = "/"\n', "/etc/db.toml: source_prefix: expected an absolute directory other than /, got '/'"),
    (BASE + '[domu.web1]\nsnapshot_sise = "1G"\n', "/etc/db.toml: domu.web1.snapshot_sise: unknown key"),
    (BASE + '[dom0.dom0z]\naddress = "10.0.0.9"\n', "/etc/db.toml: dom0.dom0z: 'dom0z' is not in dom0s ['dom0a', 'dom0b']"),
    (BASE + '[dom0.dom0b]\nadress = "10.0.0.9"\n', "/etc/db.toml: dom0.dom0b.adress: unknown key (known: address, port, append_only)"),
    (BASE + '[dom0.dom0b]\naddress = "-oProxyCommand=x"\n', "/etc/db.toml: dom0.dom0b.address: expected a host name or an IP address, got '-oProxyCommand=x'"),
    (BASE + '[dom0.dom0b]\naddress = 10\n', "/etc/db.toml: dom0.dom0b.address: expected a string, got 10"),
    (BASE + '[dom0.dom0b]\nport = 0\n', "/etc/db.toml: dom0.dom0b.port: expected a TCP port, got 0"),
    (BASE + 'dom0 = 1\n', "/etc/db.toml: dom0: expected tables like [dom0.dom0b]"),
    (BASE + '[ssh]\nendpoints = []\n', "/etc/db.toml: ssh.endpoints: unknown key"),
    ('dom0s = ["dom0a", "local"]\n', "/etc/db.toml: dom0s: 'local' is reserved for this host's own steps"),
])
def test_bad_config_names_file_key_and_expectation(text, message):
    assert error_of(text).startswith(message)


def test_missing_and_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match=r"no-such\.toml: no such configuration file"):
        load_config(str(tmp_path / "no-such.toml"))
    with pytest.raises(ConfigError, match=r": cannot read the configuration file: Is a directory"):
        load_config(str(tmp_path))


@pytest.mark.parametrize("name", ["web1", "a", "W-1.prod_2+x", "0db", "a" * 64, "a.b"])
def test_usable_domu_names(name):
    assert check_domu_name(name) == name


@pytest.mark.parametrize("name", ["", "-rf", ".hidden", "_x", "a/b", "..", "a..b", "a b", "a\tb", "a\nb",
                                  "web1\n", "a\0b", "a" * 65, "dé", "a=b", "a:b", "$(x)", None, 3])
def test_unusable_domu_names(name):
    with pytest.raises(NotEligibleError) as e:
        check_domu_name(name)
    assert str(e.value) == (f"{name!r} is not a usable DomU name: expected 1 to 64 letters, digits, '.', '_', "
                            "'+' or '-', starting with a letter or digit, without '..'")
    with pytest.raises(UsageError):
        check_domu_name(name, UsageError)


def test_domu_section_with_an_unusable_name():
    assert error_of(BASE + '[domu."../etc"]\n') == (
        "/etc/db.toml: domu.../etc: '../etc' is not a usable DomU name: expected 1 to 64 letters, digits, "
        "'.', '_', '+' or '-', starting with a letter or digit, without '..'")
    assert error_of(BASE + '[domu."a..b"]\n').startswith("/etc/db.toml: domu.a..b: 'a..b' is not a usable DomU name")


def test_snapshot_extend_max():
    assert parse(BASE).defaults.snapshot_extend_max == "50%ORIGIN"
    c = parse(BASE + 'snapshot_extend_max = "4G"\n[domu.web1]\nsnapshot_extend_max = "80%ORIGIN"\n')
    assert (c.defaults.snapshot_extend_max, c.settings_for("web1").snapshot_extend_max) == ("4G", "80%ORIGIN")
    for bad in ("10%VG", "50%FREE", "lots", "", "-1G"):
        assert error_of(BASE + f'[domu.web1]\nsnapshot_extend_max = "{bad}"\n') == (
            f"/etc/db.toml: domu.web1.snapshot_extend_max: expected a size like '4G' or '50%ORIGIN', got {bad!r}")


ONE_FILE = """dom0s = ["dom0a", "dom0b", "dom0c"]
[domu.web1]
peers = ["dom0a"]
[domu.web2]
peers = ["dom0b"]
[domu.web3]
peers = ["dom0a", "dom0b"]
[domu.web4]
"""


@pytest.mark.parametrize("host, peers", [
    ("dom0a", {"web1": (), "web2": ("dom0b",), "web3": ("dom0b",), "web4": ("dom0b", "dom0c")}),
    ("dom0b", {"web1": ("dom0a",), "web2": (), "web3": ("dom0a",), "web4": ("dom0a", "dom0c")}),
    ("dom0c", {"web1": ("dom0a",), "web2": ("dom0b",), "web3": ("dom0a", "dom0b"), "web4": ("dom0a", "dom0b")}),
])
def test_one_file_for_every_dom0_peers_leave_out_this_host(host, peers):
    c = parse(ONE_FILE, hostname=host)
    assert {d: c.peers_for(d) for d in peers} == peers


def test_a_domu_with_no_peer_but_this_host_is_an_error_of_its_own():
    c = parse(ONE_FILE, hostname="dom0a")
    e = c.no_peer("web1")
    assert e.exit_code == 78
    assert str(e) == ("/etc/db.toml: domu.web1.peers: web1 runs on dom0a, and its peers ['dom0a'] name no "
                      "other Dom0 to copy it to (add another Dom0 to its peers)")
    alone = parse('dom0s = ["dom0a"]\n')
    assert alone.peers_for("x") == ()
    assert str(alone.no_peer("x")).startswith(
        "/etc/db.toml: dom0s: x runs on dom0a, and dom0s ['dom0a'] name no other Dom0 to copy it to")
    glob = parse(BASE + 'peers = ["dom0a"]\n')
    assert str(glob.no_peer("x")).startswith("/etc/db.toml: peers: x runs on dom0a, and its peers ['dom0a']")


ADDRESSES = BASE + '[ssh]\nport = 2200\n[dom0.dom0b]\naddress = "10.0.0.2"\nport = 2222\n[domu.web1.ssh]\nuser = "backup"\n'


def test_a_dom0_may_have_an_address_and_port_beside_its_name():
    c = parse(ADDRESSES)
    assert c.dom0s == ("dom0a", "dom0b") and c.peers_for("web1") == ("dom0b",)
    for ssh in (c.defaults.ssh, c.settings_for("web1").ssh):  # the [domu.NAME] sections inherit them
        assert ssh.endpoint("dom0b") == ("10.0.0.2", 2222)
        assert ssh.endpoint("dom0a") == ("dom0a", 2200)  # no table: the name and ssh.port
    assert parse(BASE + '[dom0.dom0b]\nport = 2222\n').defaults.ssh.endpoint("dom0b") == ("dom0b", 2222)
    assert parse(BASE + '[dom0.dom0b]\naddress = "[fd00::2]"\n').defaults.ssh.endpoint("dom0b") == ("fd00::2", 22)


def test_max_age():
    assert parse(BASE).max_age == 2 * 86400
    assert parse(BASE + 'max_age = "36h"\n').max_age == 36 * 3600
    assert error_of(BASE + 'max_age = "2 days"\n') == \
        "/etc/db.toml: max_age: expected an age like '36h', '2d' or '1w', got '2 days'"
    assert error_of(BASE + 'max_age = "0d"\n').startswith("/etc/db.toml: max_age: expected an age")


def test_serve_section_and_append_only_peers():
    c = parse(BASE + '[dom0.dom0b]\nappend_only = true\n[serve]\nclients = { dom0b = ["web1", "db1"] }\n'
                     'allow_prune_from = ["dom0b"]\n')
    assert c.serve_clients == {"dom0b": ("web1", "db1")} and c.allow_prune_from == ("dom0b",)
    assert c.append_only == ("dom0b",) and parse(BASE).append_only == () and parse(BASE).serve_clients == {}
    assert error_of(BASE + '[serve]\nclients = { dom0c = ["web1"] }\n').startswith(
        "/etc/db.toml: serve.clients.dom0c: 'dom0c' is not in dom0s")
    assert error_of(BASE + '[serve]\nclients = { dom0b = ["../etc"] }\n').startswith("/etc/db.toml: serve.clients.dom0b:")
    assert error_of(BASE + '[serve]\nclient = {}\n').startswith("/etc/db.toml: serve.client: unknown key")
    assert error_of(BASE + '[dom0.dom0b]\nappend_only = "yes"\n').startswith(
        "/etc/db.toml: dom0.dom0b.append_only: expected true or false")
