"""containerd's registry hosts directory, read as containerd reads it (rafs.image.hosts), and the
one-line TLS errors (rafs.image.tls)."""
from __future__ import annotations

import logging
import ssl

import pytest

from rafs.errors import BackendError
from rafs.image.hosts import (ALL_CAPABILITIES, HostsConfigError, RegistryHost, find_host_dir,
                              host_dir_candidates, namespace_of, parse_duration, parse_hosts_toml,
                              resolve_hosts)
from rafs.image.tls import TLSError, is_plain_http_answer, ssl_context, system_ca_file, tls_error


def write(root, namespace: str, text: str):
    d = root / namespace
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d


# --------------------------------------------------------------------------- the directory

def test_no_configuration_is_the_registry_itself(tmp_path):
    [h] = resolve_hosts("reg.example:5000", tmp_path)
    assert (h.scheme, h.host, h.path, h.url) == ("https", "reg.example:5000", "/v2", "https://reg.example:5000/v2")
    assert h.capabilities == ALL_CAPABILITIES and not h.mirror and h.ns is None
    assert h.skip_verify is None and not h.has_tls_config and not h.http_fallback
    assert resolve_hosts("reg.example:5000", None) == [h.__class__(**{**h.__dict__, "hosts_dir": ""})]


def test_plain_http_is_the_default_scheme_only(tmp_path):
    [h] = resolve_hosts("reg.example:5000", tmp_path, plain_http=True)
    assert h.url == "http://reg.example:5000/v2"
    write(tmp_path, "reg.example:5000", 'server = "https://reg.example:5000"\n')
    [h] = resolve_hosts("reg.example:5000", tmp_path, plain_http=True)
    assert h.url == "https://reg.example:5000/v2"            # the file's explicit scheme wins


def test_docker_hub_namespace(tmp_path):
    for name in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        assert namespace_of(name) == "docker.io"
    [h] = resolve_hosts("docker.io", tmp_path, plain_http=True)
    assert h.url == "https://registry-1.docker.io/v2" and h.ns is None
    write(tmp_path, "docker.io", '[host."https://mirror.local"]\ncapabilities = ["pull"]\n')
    m, o = resolve_hosts("index.docker.io", tmp_path)
    assert m.ns == "docker.io" and m.mirror and o.host == "registry-1.docker.io" and not o.mirror


def test_directory_lookup_order(tmp_path):
    assert [p.name for p in map(__import__("pathlib").Path, host_dir_candidates(str(tmp_path), "r.io:5000"))] == \
        ["r.io_5000_", "r.io:5000", "_default"]
    assert [p.rsplit("/", 1)[1] for p in host_dir_candidates(str(tmp_path), "r.io")] == ["r.io", "_default"]
    assert find_host_dir(str(tmp_path), "r.io:5000") is None
    write(tmp_path, "_default", '[host."https://everyone.mirror"]\n')
    assert find_host_dir(str(tmp_path), "r.io:5000").endswith("_default")
    write(tmp_path, "r.io:5000", 'server = "https://colon"\n')
    assert resolve_hosts("r.io:5000", tmp_path)[-1].host == "colon"
    write(tmp_path, "r.io_5000_", 'server = "https://underscore"\n')
    assert resolve_hosts("r.io:5000", tmp_path)[-1].host == "underscore"
    # _default applies to any other registry: its mirror first, then that registry itself
    m, o = resolve_hosts("other.io", tmp_path)
    assert m.url == "https://everyone.mirror/v2" and m.ns == "other.io" and o.url == "https://other.io/v2"


# --------------------------------------------------------------------------- hosts.toml

HOSTS = """
server = "https://registry.example.com"
ca = "root-ca.pem"

[host."https://mirror-a.local"]
  capabilities = ["pull"]
  ca = ["/etc/certs/a.pem", "b.pem"]
  [host."https://mirror-a.local".header]
    x-one = "1"
    x-many = ["a", "b"]

[host."http://mirror-b.local:8080/v2/upstream"]
  capabilities = ["pull", "resolve"]
  override_path = true
  dial_timeout = "1500ms"

[host."mirror-c.local/prefix"]
  client = [["c.cert", "c.key"], ["/abs/both.pem", ""]]
"""


def test_hosts_in_file_order_then_server(tmp_path):
    d = write(tmp_path, "registry.example.com", HOSTS)
    a, b, c, server = resolve_hosts("registry.example.com", tmp_path)
    assert [h.mirror for h in (a, b, c, server)] == [True, True, True, False]
    assert a.url == "https://mirror-a.local/v2" and a.capabilities == {"pull"}
    assert a.ca == ("/etc/certs/a.pem", str(d / "b.pem"))         # relative to hosts.toml
    assert a.headers() == {"x-one": "1", "x-many": "a, b"}
    assert a.ns == "registry.example.com"
    assert b.url == "http://mirror-b.local:8080/v2/upstream" and b.capabilities == {"pull", "resolve"}
    assert b.dial_timeout == 1.5 and not b.http_fallback
    assert c.url == "https://mirror-c.local/prefix/v2"                # no scheme: https; path + /v2
    assert c.client == ((str(d / "c.cert"), str(d / "c.key")), ("/abs/both.pem", ""))
    assert server.url == "https://registry.example.com/v2" and server.capabilities == ALL_CAPABILITIES
    assert server.ca == (str(d / "root-ca.pem"),) and server.ns is None
    assert server.config == str(d / "hosts.toml") and server.config_hint() == str(d / "hosts.toml")


def test_server_elsewhere_gets_ns_and_path_rules(tmp_path):
    write(tmp_path, "r.io", 'server = "https://proxy.local/v2/"\n')
    [h] = resolve_hosts("r.io", tmp_path)
    assert h.url == "https://proxy.local/v2" and h.ns == "r.io"
    write(tmp_path, "r.io", 'server = "https://proxy.local/api"\noverride_path = true\n')
    assert resolve_hosts("r.io", tmp_path)[0].url == "https://proxy.local/api"


def test_client_forms(tmp_path):
    base = str(tmp_path)
    (_, s), = parse_hosts_toml('client = "one.pem"', base)[-1:]
    assert s.client == ((f"{base}/one.pem", ""),)
    (_, s), = parse_hosts_toml('client = ["a.pem", "/b.pem"]', base)[-1:]
    assert s.client == ((f"{base}/a.pem", ""), ("/b.pem", ""))


def test_tls_settings_on_an_http_host_mean_https_first(tmp_path):
    write(tmp_path, "r.io:5000", '[host."http://m.local:5000"]\nskip_verify = true\n'
                                 '[host."http://m80.local:80"]\nskip_verify = true\n'
                                 '[host."http://plain.local:5000"]\n')
    m, m80, plain, _ = resolve_hosts("r.io:5000", tmp_path)
    assert (m.scheme, m.http_fallback, m.skip_verify) == ("https", True, True)
    assert (m80.scheme, m80.http_fallback) == ("http", False)           # port 80: not ambiguous
    assert (plain.scheme, plain.http_fallback) == ("http", False)


def test_insecure_skips_verification_and_allows_plain_http(tmp_path):
    write(tmp_path, "r.io", '[host."https://m.local"]\n[host."http://h.local"]\n')
    m, h, o = resolve_hosts("r.io", tmp_path, insecure=True)
    assert all(x.skip_verify for x in (m, h, o))
    assert m.http_fallback and o.http_fallback and o.scheme == "https"
    assert h.scheme == "http" and not h.http_fallback                   # said http: stays plain HTTP


def test_bad_file_falls_back_to_certificate_files_with_a_warning(tmp_path, caplog):
    d = write(tmp_path, "r.io", '[host."https://m.local"]\ncapabilities = ["pull", "teleport"]\n')
    (d / "extra-ca.crt").write_text("x")
    (d / "client.cert").write_text("x")
    (d / "client.key").write_text("x")
    (d / "lonely.cert").write_text("x")
    with caplog.at_level(logging.WARNING, logger="rafs.image.hosts"):
        [h] = resolve_hosts("r.io", tmp_path)
    assert "unknown capability 'teleport'" in caplog.text and "certificate files" in caplog.text
    assert h.url == "https://r.io/v2" and h.ca == (str(d / "extra-ca.crt"),)
    assert h.client == ((str(d / "client.cert"), str(d / "client.key")), (str(d / "lonely.cert"), ""))
    (d / "hosts.toml").write_text("server = [unclosed\n")
    with caplog.at_level(logging.WARNING, logger="rafs.image.hosts"):
        assert resolve_hosts("r.io", tmp_path)[0].ca == (str(d / "extra-ca.crt"),)
    assert "not valid TOML" in caplog.text


def test_docker_certificate_files_without_hosts_toml(tmp_path):
    d = tmp_path / "r.io:443"
    d.mkdir()
    (d / "ca.crt").write_text("x")
    [h] = resolve_hosts("r.io:443", tmp_path)
    assert h.ca == (str(d / "ca.crt"),) and h.config == str(d)
    assert h.config_hint() == str(d / "hosts.toml")


def test_value_errors(tmp_path):
    for bad in ('capabilities = "pull"', 'skip_verify = "yes"', 'ca = 3', 'client = [["a"]]', 'header = "x"',
                'dial_timeout = "soon"', 'server = 5', 'host = 1'):
        with pytest.raises(HostsConfigError):
            parse_hosts_toml(bad, str(tmp_path))


def test_durations():
    assert parse_duration("1s") == 1.0 and parse_duration("1m30s") == 90.0
    assert parse_duration("250ms") == 0.25 and parse_duration("2h") == 7200.0 and parse_duration("0") == 0.0
    with pytest.raises(HostsConfigError):
        parse_duration("5")


def test_capabilities_decide_nothing_is_pushed_to_a_pull_mirror(tmp_path):
    write(tmp_path, "r.io", '[host."https://m.local"]\ncapabilities = ["pull"]\n')
    m, o = resolve_hosts("r.io", tmp_path)
    assert m.can("pull") and not m.can("resolve") and not m.can("push")
    assert o.can("push") and o.can("resolve")


# --------------------------------------------------------------------------- TLS

def test_system_store_is_ssl_cert_file_or_the_distribution_bundle(monkeypatch, tmp_path):
    bundle = tmp_path / "bundle.pem"
    bundle.write_text("")
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    assert system_ca_file() == str(bundle)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    assert system_ca_file() is None
    monkeypatch.delenv("SSL_CERT_FILE")
    import os
    from rafs.image.tls import SYSTEM_CA_FILES
    assert system_ca_file() == next((p for p in SYSTEM_CA_FILES if os.path.isfile(p)), None)


def test_unusable_ca_or_client_files_are_one_line(tmp_path):
    with pytest.raises(BackendError, match=r"^X/hosts.toml: ca .*missing.crt: no such file$"):
        ssl_context((str(tmp_path / "missing.crt"),), (), False, "X/hosts.toml")
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate")
    with pytest.raises(BackendError, match="not a PEM certificate"):
        ssl_context((str(junk),), (), False, "X")
    with pytest.raises(BackendError, match="client .*junk.crt: not a usable PEM"):
        ssl_context((), ((str(junk), ""),), False, "X")
    ctx = ssl_context((), (), True, "")
    assert ctx.verify_mode == ssl.CERT_NONE and not ctx.check_hostname


def _wrapped(e: BaseException) -> BaseException:
    """An exception as requests raises it: the ssl error deep inside urllib3's."""
    import requests
    import urllib3
    inner = urllib3.exceptions.SSLError(e)
    outer = urllib3.exceptions.MaxRetryError(None, "/v2/", inner)
    return requests.exceptions.SSLError(outer)


def test_tls_errors_name_the_host_and_what_to_configure():
    h = RegistryHost(host="r.io:5000", namespace="r.io:5000", hosts_dir="/etc/containerd/certs.d")
    e = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    e.verify_message, e.reason = "self-signed certificate in certificate chain", "CERTIFICATE_VERIFY_FAILED"
    err = tls_error(_wrapped(e), "r.io:5000", h, "ping")
    assert isinstance(err, TLSError) and err.kind == "untrusted" and err.host == "r.io:5000"
    text = str(err)
    assert "\n" not in text and "urllib3" not in text and "HTTPSConnectionPool" not in text
    assert text.startswith("ping: TLS certificate of r.io:5000 is not trusted (self-signed certificate")
    assert "/etc/containerd/certs.d/r.io:5000/hosts.toml" in text and "ca = " in text and "skip_verify" in text
    e.verify_message = "Hostname mismatch, certificate is not valid for 'r.io'."
    assert tls_error(_wrapped(e), "r.io:5000", h).kind == "hostname"
    plain = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)")
    plain.reason = "WRONG_VERSION_NUMBER"
    assert is_plain_http_answer(_wrapped(plain))
    err = tls_error(_wrapped(plain), "r.io:5000", h)
    assert err.kind == "plain-http" and "does not speak TLS (wrong version number)" in str(err)
    alert = ssl.SSLError(1, "[SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required")
    alert.reason = "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert not is_plain_http_answer(_wrapped(alert))
    err = tls_error(_wrapped(alert), "r.io:5000", h)
    assert err.kind == "client-cert" and "client = " in str(err)
