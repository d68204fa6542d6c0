"""discovery.watcher.haproxy pure functions, on outputs captured from HAProxy 2.6.12."""

from __future__ import annotations

import pytest

from discovery.errors import HAProxyError
from discovery.watcher.haproxy import (
    batch_commands,
    check_command,
    parse_info,
    parse_servers_state,
    parse_show_proc,
    response_error,
    server_view,
    slot_commands,
)
from discovery.watcher.slots import Slot

HEADER = (
    "# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight "
    "srv_iweight srv_time_since_last_change srv_check_status srv_check_result "
    "srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id "
    "srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr "
    "srv_agent_port"
)
# `show servers state` after: web/s1 set ready (198.51.100.3:8080 w100), web/s2 drain, web/s3
# untouched (`disabled` in the config), api/live a plain server, api/s1 untouched.
SERVERS_STATE = (
    "1\n" + HEADER + "\n"
    "3 web 1 s1 198.51.100.3 2 4 100 1 0 1 0 0 8 0 0 0 - 8080 - 0 0 - - 0\n"
    "3 web 2 s2 198.51.100.4 2 12 20 1 0 1 0 0 8 0 0 0 - 8081 - 0 0 - - 0\n"
    "3 web 3 s3 127.0.0.1 0 5 1 1 0 1 0 0 8 0 0 0 - 1 - 0 0 - - 0\n"
    "4 api 1 live 127.0.0.1 2 0 50 50 0 1 0 2 0 0 0 0 - 9 - 0 0 - - 0\n"
    "4 api 2 s1 127.0.0.1 0 5 1 1 0 1 0 0 8 0 0 0 - 1 - 0 0 - - 0\n\n"
)
SHOW_PROC_OLD_WORKER = (
    "#<PID>          <type>          <reloads>       <uptime>        <version>      \n"
    "1016            master          1 [failed: 0]   0d00h00m00s     2.6.12-1+deb12u4\n"
    "# workers\n"
    "1023            worker          0               0d00h00m00s     2.6.12-1+deb12u4\n"
    "# old workers\n"
    "1018            worker          1               0d00h00m00s     2.6.12-1+deb12u4\n"
    "# programs\n\n"
)
SHOW_PROC_FAILED = (
    "#<PID>          <type>          <reloads>       <uptime>        <version>      \n"
    "32002           master          3 [failed: 1]   0d00h00m29s     2.6.12-1+deb12u4\n"
    "# workers\n"
    "761             worker          1               0d00h00m06s     2.6.12-1+deb12u4\n"
    "# programs\n\n"
)
UNKNOWN = ("Unknown command, but maybe one of the following ones is a better match:\n"
           "  show env [var]                          : dump environment variables known\n"
           "  quit                                    : disconnect\n\n")


def test_parse_servers_state_fields():
    state = parse_servers_state(SERVERS_STATE)
    assert list(state) == [("web", "s1"), ("web", "s2"), ("web", "s3"), ("api", "live"),
                           ("api", "s1")]
    s1 = state[("web", "s1")]
    assert (s1["srv_addr"], s1["srv_port"], s1["srv_uweight"]) == ("198.51.100.3", "8080", "100")
    assert (s1["srv_op_state"], s1["srv_admin_state"]) == ("2", "4")
    assert state[("api", "live")]["srv_iweight"] == "50"


def test_server_view_maps_admin_bits_to_slot_states():
    views = {k: server_view(v) for k, v in parse_servers_state(SERVERS_STATE).items()}
    # CMAINT (0x04, from `disabled`) stays set after `state ready`: still ready.
    assert views[("web", "s1")].matches(Slot("s1", "198.51.100.3", 8080, 100, "ready"))
    assert views[("web", "s1")].operational == "running"
    assert views[("web", "s2")].as_slot() == Slot("s2", "198.51.100.4", 8081, 20, "drain")
    assert views[("web", "s3")].state == "maint"
    assert views[("web", "s3")].operational == "stopped"
    assert views[("api", "live")].state == "ready"
    assert str(views[("web", "s2")]) == "web/s2 drain at 198.51.100.4:8081 weight 20 (running)"


@pytest.mark.parametrize("text", ["", "\n"])
def test_parse_servers_state_empty(text):
    assert parse_servers_state(text) == {}


def test_parse_servers_state_only_header():
    assert parse_servers_state("1\n" + HEADER + "\n\n") == {}


@pytest.mark.parametrize("text", [
    "2\n" + HEADER + "\n",                               # unknown format version
    "1\n" + HEADER + "\n3 web 1 s1 198.51.100.3 2 4\n",      # short row
    "1\n3 web 1 s1 198.51.100.3 2 4 100 1 0 1 0 0 8 0 0 0 - 8080 - 0 0 - - 0\n",  # no header
    "Can't find backend.\n\n",                           # an error answer
])
def test_parse_servers_state_rejects(text):
    with pytest.raises(HAProxyError):
        parse_servers_state(text)


def test_parse_show_proc_with_old_worker():
    proc = parse_show_proc(SHOW_PROC_OLD_WORKER)
    assert (proc.master.pid, proc.master.reloads, proc.master.failed) == (1016, 1, 0)
    assert proc.master.version == "2.6.12-1+deb12u4"
    assert [(p.pid, p.reloads) for p in proc.workers] == [(1023, 0)]
    assert [(p.pid, p.reloads) for p in proc.old_workers] == [(1018, 1)]
    assert proc.programs == []


def test_parse_show_proc_failed_reload():
    proc = parse_show_proc(SHOW_PROC_FAILED)
    assert (proc.master.reloads, proc.master.failed) == (3, 1)
    assert [p.pid for p in proc.workers] == [761]  # the old worker is still the current one


def test_parse_show_proc_program_section():
    text = SHOW_PROC_FAILED.replace(
        "# programs\n", "# programs\n900             dataplane       0               "
        "0d00h00m06s     -\n")
    assert [(p.pid, p.kind) for p in parse_show_proc(text).programs] == [(900, "dataplane")]


@pytest.mark.parametrize("text", ["", "garbage here\n", UNKNOWN])
def test_parse_show_proc_rejects(text):
    with pytest.raises(HAProxyError):
        parse_show_proc(text)


@pytest.mark.parametrize(("cmd", "answer", "error"), [
    ("set server web/s9 weight 3", "No such server.\n\n", "No such server."),
    ("set server nob/s1 state ready", "No such backend.\n\n", "No such backend."),
    ("set server web state ready", "Require 'backend/server'.\n\n", "Require 'backend/server'."),
    ("set server web/s1 state up",
     "'set server <srv> state' expects 'ready', 'drain' and 'maint'.\n\n",
     "'set server <srv> state' expects 'ready', 'drain' and 'maint'."),
    ("set server web/s1 weight abc", "Empty weight string empty or preceded by garbage",
     "Empty weight string empty or preceded by garbage"),
    ("set server web/s1 weight 300",
     "Absolute weight can only be between 0 and 256 inclusive.\n\n",
     "Absolute weight can only be between 0 and 256 inclusive."),
    ("set server web/s1 addr notanip port 1",
     "Invalid addr 'notanip' by 'stats socket command'\n\n",
     "Invalid addr 'notanip' by 'stats socket command'"),
    ("set server web/s1 weight 3", "Permission denied\n\n", "Permission denied"),
    ("show servers state nope", "Can't find backend.\n\n", "Can't find backend."),
    ("show foo", UNKNOWN, UNKNOWN.splitlines()[0]),
    ("foo", UNKNOWN, UNKNOWN.splitlines()[0]),
])
def test_response_error_detects_refusals(cmd, answer, error):
    assert response_error(cmd, answer) == error


@pytest.mark.parametrize(("cmd", "answer"), [
    ("set server web/s1 weight 3", "\n"),
    ("set server web/s1 state ready", ""),
    ("set server web/s1 addr 203.0.113.9 port 81",
     "IP changed from '198.51.100.3' to '203.0.113.9', port changed from '8080' to '81' by "
     "'stats socket command'\n\n"),
    ("set server web/s1 addr 203.0.113.9 port 81",
     "no need to change the addr, no need to change the port by 'stats socket command'\n\n"),
    ("set server web/s1 addr 127.0.0.1 port 8081",
     "No need to change the addr, port changed from '1' to '8081' by 'stats socket command'"),
    ("show servers state", SERVERS_STATE),
    ("show proc", SHOW_PROC_OLD_WORKER),
    ("show info", "Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nPid: 1023\n"),
])
def test_response_error_accepts_successes(cmd, answer):
    assert response_error(cmd, answer) is None


def test_parse_info():
    info = parse_info("Name: HAProxy\nVersion: 2.6.12-1+deb12u4\nPid: 1023\nUptime: 0d 0h00m00s\n")
    assert info["Pid"] == "1023"
    assert info["Uptime"] == "0d 0h00m00s"


@pytest.mark.parametrize("cmd", [
    "set server web/s1 weight 3; shutdown sessions server web/s1",
    "show info\nshutdown frontend fe",
    "show info\r",
    "show\x00info",
    "show\tinfo",
    "show info\x7f",
    "",
    "   ",
])
def test_check_command_rejects_separators(cmd):
    with pytest.raises(HAProxyError):
        check_command(cmd)


def test_check_command_strips():
    assert check_command("  show info ") == "show info"


def test_slot_commands_ready_points_first_then_enables():
    assert slot_commands("web", Slot("s3", "127.0.0.1", 8080, 100, "ready")) == [
        "set server web/s3 addr 127.0.0.1 port 8080",
        "set server web/s3 weight 100",
        "set server web/s3 state ready",
    ]


def test_slot_commands_drain_points_first():
    assert slot_commands("web", Slot("s1", "192.0.2.1", 81, 5, "drain"))[-1] == (
        "set server web/s1 state drain")


def test_slot_commands_maint_disables_first():
    assert slot_commands("web", Slot("s2")) == [
        "set server web/s2 state maint",
        "set server web/s2 addr 127.0.0.1 port 1",
        "set server web/s2 weight 0",
    ]


def test_a_backend_of_removals_only_is_out_of_service_first():
    """A dead host's instances (every changed slot of a backend to maint) stop taking traffic
    before anything is re-pointed; a backend with an add and a removal keeps its order."""
    mixed = [Slot("s1"), Slot("s3", "127.0.0.1", 8080, 100, "ready")]
    gone = [Slot("s1"), Slot("s2")]
    cmds = batch_commands({"api": mixed, "web": gone, "db": [Slot("s4")]})
    assert cmds[:3] == ["set server web/s1 state maint", "set server web/s2 state maint",
                        "set server db/s4 state maint"]
    assert cmds[3:] == [*slot_commands("api", mixed[0]), *slot_commands("api", mixed[1]),
                        *slot_commands("web", gone[0])[1:], *slot_commands("web", gone[1])[1:],
                        *slot_commands("db", Slot("s4"))[1:]]
    assert sorted(cmds) == sorted(c for b, slots in (("api", mixed), ("web", gone),
                                                     ("db", [Slot("s4")]))
                                  for s in slots for c in slot_commands(b, s))


def test_slot_commands_ipv6():
    assert slot_commands("web", Slot("s1", "::1", 80, 1, "ready"))[0] == (
        "set server web/s1 addr ::1 port 80")


@pytest.mark.parametrize(("backend", "slot"), [
    ("web;shutdown", Slot("s1")),
    ("web", Slot("s1 state ready")),
    ("web", Slot("s1/x")),
    ("", Slot("s1")),
    ("web", Slot("s1", "example.com", 80, 1, "ready")),
    ("web", Slot("s1", "192.0.2.1; show info", 80, 1, "ready")),
    ("web", Slot("s1", "192.0.2.1", 0, 1, "ready")),
    ("web", Slot("s1", "192.0.2.1", 99999, 1, "ready")),  # HAProxy would wrap it to 34463
    ("web", Slot("s1", "192.0.2.1", 80, 257, "ready")),
    ("web", Slot("s1", "192.0.2.1", 80, -1, "ready")),
    ("web", Slot("s1", "192.0.2.1", 80, 1, "up")),  # type: ignore[arg-type]
])
def test_slot_commands_validates(backend, slot):
    with pytest.raises(HAProxyError):
        slot_commands(backend, slot)


@pytest.mark.parametrize("address", ["::1%lo]:25080 init-addr none backup cookie [",
                                     "192.0.2.1 backup", "0.0.0.0", "ff02::1"])
def test_slot_commands_refuse_what_would_add_a_token(address: str) -> None:
    with pytest.raises(HAProxyError, match="address"):
        slot_commands("web", Slot("s1", address, 8080, 100, "ready"))


@pytest.mark.parametrize("backend", ["web\n", "web x", "", "w" * 129])
def test_slot_commands_refuse_a_bad_backend_name(backend):
    """The name must be all of it: a regex ``$`` also matches before a final newline."""
    with pytest.raises(HAProxyError, match="invalid backend name"):
        slot_commands(backend, Slot("s3", "127.0.0.1", 8080, 100, "ready"))
