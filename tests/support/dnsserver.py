"""An authoritative DNS server for tests, built on dnspython: UDP and TCP on loopback.

Serves the zones a test gives it (as dicts or as master-file text), answers with the AA
bit, follows CNAMEs inside its zones, says NXDOMAIN / NODATA with the zone's SOA (so
negative caching can be tested), and can be told to stay silent (a timeout) or to answer
SERVFAIL for chosen names. It never forwards or recurses: names outside its zones get
REFUSED. Runs in background threads, so sync and async tests both use it::

    with DnsServer({"example.test": {"@": {"MX": "10 mx", "TXT": "v=spf1 mx -all"},
                                     "mx": {"A": "192.0.2.10"}}}) as ns:
        ...  # point a resolver at ("127.0.0.1", ns.port)
        ns.timeout_names.add("slow.example.test")     # no answer at all
        ns.servfail_names.add("broken.example.test")  # SERVFAIL
        ns.set("example.test", "new", "A", ["192.0.2.11"])
        assert ("new.example.test", "A", "udp") in ns.queries

UDP answers larger than the client's EDNS payload (512 bytes without EDNS) are sent
truncated (TC), so clients retry over TCP.
"""
from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterable, Mapping

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdataset
import dns.rdatatype
import dns.rrset
import dns.zone

from tests.support.constants import LOOPBACK

IN = dns.rdataclass.IN


def _txt(value: str) -> str:
    """Plain text -> TXT presentation: quoted 255-byte strings."""
    raw = value.encode()
    chunks = [raw[i:i + 255] for i in range(0, len(raw), 255)] or [b""]
    return " ".join('"' + c.decode().replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class Zone:
    def __init__(self, origin: str, ttl: int, negative_ttl: int):
        self.origin = dns.name.from_text(origin)
        self.ttl = ttl
        self.nodes: dict[dns.name.Name, dict[int, dns.rdataset.Rdataset]] = {}
        soa = f"ns.{origin.rstrip('.')}. hostmaster.{origin.rstrip('.')}. 1 3600 600 86400 {negative_ttl}"
        self.put(self.origin, "SOA", [soa], ttl)

    def put(self, name: dns.name.Name, rdtype: str, values: Iterable[str], ttl: int | None = None) -> None:
        rtype = dns.rdatatype.from_text(rdtype)
        rds = dns.rdataset.Rdataset(IN, rtype, ttl=self.ttl if ttl is None else ttl)
        for v in values:
            text = _txt(v) if rtype == dns.rdatatype.TXT and not v.startswith('"') else v
            rds.add(dns.rdata.from_text(IN, rtype, text, origin=self.origin, relativize=False))
        node = self.nodes.setdefault(name, {})
        if len(rds):
            node[rtype] = rds
        else:
            node.pop(rtype, None)

    def exists(self, name: dns.name.Name) -> bool:
        """The name has records, or is an empty non-terminal above one that has."""
        return any(n == name or n.is_subdomain(name) for n, rs in self.nodes.items() if rs)

    def wildcard(self, name: dns.name.Name) -> dict | None:
        parent = name.parent()
        while parent.is_subdomain(self.origin):
            star = dns.name.Name((b"*",) + parent.labels)
            if star in self.nodes:
                return self.nodes[star]
            if self.exists(parent) or parent == self.origin:
                return None
            parent = parent.parent()
        return None


class DnsServer:
    def __init__(self, zones: Mapping[str, Mapping | str] | None = None, host: str = LOOPBACK,
                 port: int = 0, ttl: int = 300, negative_ttl: int = 60):
        self.host = host
        self.ttl, self.negative_ttl = ttl, negative_ttl
        self.zones: dict[dns.name.Name, Zone] = {}
        self.timeout_names: set[str] = set()   # names (any type) or "name/TYPE": never answered
        self.servfail_names: set[str] = set()  # names (any type) or "name/TYPE": SERVFAIL
        self.delays: dict[str, float] = {}     # name or "name/TYPE" -> seconds before answering
        self.queries: list[tuple[str, str, str]] = []  # (name, TYPE, "udp" | "tcp")
        self.errors: list[str] = []  # exceptions while answering (a bad test zone)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        for origin, records in (zones or {}).items():
            self.add_zone(origin, records)
        self.udp, self.tcp = _bind_pair(host, port)
        self.port = self.udp.getsockname()[1]
        self.udp.settimeout(0.2)  # the serving loops wake up to notice stop()
        self.tcp.settimeout(0.2)

    # --- zones ---------------------------------------------------------------------
    def add_zone(self, origin: str, records: Mapping | str, negative_ttl: int | None = None) -> None:
        """``records``: ``{"@": {"A": "192.0.2.1"}, "www": {"CNAME": "@"}, "abs.name.": {...}}``
        (a value is one string or a list; TXT values are plain text), or master-file text."""
        neg = self.negative_ttl if negative_ttl is None else negative_ttl
        zone = Zone(origin, self.ttl, neg)
        with self._lock:
            self.zones[zone.origin] = zone
        if isinstance(records, str):
            parsed = dns.zone.from_text(records, origin=origin, relativize=False, check_origin=False)
            for name, node in parsed.nodes.items():
                for rds in node.rdatasets:
                    zone.nodes.setdefault(name, {})[rds.rdtype] = rds
            return
        for name, types in records.items():
            for rdtype, values in types.items():
                self.set(origin, name, rdtype, values)

    def set(self, origin: str, name: str, rdtype: str, values: str | Iterable[str], ttl: int | None = None) -> None:
        """Replace one RRset (``[]`` deletes it). ``name`` relative to ``origin`` unless it ends with a dot."""
        zone = self.zones[dns.name.from_text(origin)]
        abs_name = zone.origin if name in ("@", "") else dns.name.from_text(name, zone.origin)
        with self._lock:
            zone.put(abs_name, rdtype.upper(), [values] if isinstance(values, str) else list(values), ttl)

    # --- life ----------------------------------------------------------------------
    def start(self) -> "DnsServer":
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, daemon=True, name=f"dns-{target.__name__}")
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for s in (self.udp, self.tcp):
            try:
                s.close()
            except OSError:
                pass
        for t in self._threads:
            t.join(2)

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def count(self, name: str, rdtype: str | None = None) -> int:
        name = name.rstrip(".").lower()
        return sum(1 for n, t, _ in self.queries if n == name and (rdtype is None or t == rdtype))

    # --- answering -----------------------------------------------------------------
    def _switch(self, table, qname: str, qtype: str):
        for key in (f"{qname}/{qtype}", qname):
            if isinstance(table, dict) and key in table:
                return table[key]
            if isinstance(table, set) and key in table:
                return True
        return None

    def answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return None
        q = query.question[0]
        qname_text = q.name.to_text(omit_final_dot=True).lower()
        qtype_text = dns.rdatatype.to_text(q.rdtype)
        with self._lock:
            self.queries.append((qname_text, qtype_text, transport))
        if self._switch(self.timeout_names, qname_text, qtype_text):
            return None
        delay = self._switch(self.delays, qname_text, qtype_text)
        if delay:
            time.sleep(delay)  # the server's own thread, never the test's
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        response.flags &= ~dns.flags.RA
        if self._switch(self.servfail_names, qname_text, qtype_text):
            response.set_rcode(dns.rcode.SERVFAIL)
            return self._wire(response, query, transport)
        with self._lock:
            self._resolve(response, q.name, q.rdtype)
        return self._wire(response, query, transport)

    def _zone_of(self, name: dns.name.Name) -> Zone | None:
        best = None
        for origin, zone in self.zones.items():
            if name.is_subdomain(origin) and (best is None or len(origin) > len(best.origin)):
                best = zone
        return best

    def _resolve(self, response, name, rdtype) -> None:
        zone = self._zone_of(name)
        if zone is None:
            response.set_rcode(dns.rcode.REFUSED)
            response.flags &= ~dns.flags.AA
            return
        for _ in range(16):
            node = zone.nodes.get(name)
            if not node and not zone.exists(name):
                node = zone.wildcard(name)
                if node is None:
                    if not response.answer:
                        response.set_rcode(dns.rcode.NXDOMAIN)
                    self._soa(response, zone)
                    return
            node = node or {}
            if rdtype in node:
                response.answer.append(dns.rrset.from_rdata_list(name, node[rdtype].ttl, list(node[rdtype])))
                return
            cname = node.get(dns.rdatatype.CNAME)
            if cname is None or rdtype == dns.rdatatype.CNAME:
                self._soa(response, zone)  # NODATA
                return
            response.answer.append(dns.rrset.from_rdata_list(name, cname.ttl, list(cname)))
            name = cname[0].target
            zone = self._zone_of(name)
            if zone is None:
                return  # out of our zones: the client's resolver would go on from here

    def _soa(self, response, zone: Zone) -> None:
        soa = zone.nodes[zone.origin][dns.rdatatype.SOA]
        response.authority.append(dns.rrset.from_rdata_list(zone.origin, soa.ttl, list(soa)))

    def _wire(self, response, query, transport: str) -> bytes:
        if transport == "tcp":
            return response.to_wire(max_size=65535)
        limit = max(512, query.payload) if query.edns >= 0 else 512
        try:
            return response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer, response.authority, response.additional = [], [], []
            response.flags |= dns.flags.TC
            return response.to_wire()

    def _safe_answer(self, wire: bytes, transport: str) -> bytes | None:
        try:
            return self.answer(wire, transport)
        except Exception as e:  # a bug in a test zone: say SERVFAIL and remember why
            self.errors.append(f"{type(e).__name__}: {e}")
            try:
                response = dns.message.make_response(dns.message.from_wire(wire))
                response.set_rcode(dns.rcode.SERVFAIL)
                return response.to_wire()
            except Exception:
                return None

    # --- sockets -------------------------------------------------------------------
    def _serve_udp(self) -> None:
        while not self._stop.is_set():
            try:
                wire, peer = self.udp.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._udp_reply, args=(wire, peer), daemon=True).start()

    def _udp_reply(self, wire: bytes, peer) -> None:
        out = self._safe_answer(wire, "udp")
        if out is not None and not self._stop.is_set():
            try:
                self.udp.sendto(out, peer)
            except OSError:
                pass

    def _serve_tcp(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.tcp.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            threading.Thread(target=self._tcp_conn, args=(conn,), daemon=True).start()

    def _tcp_conn(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        with conn:
            while not self._stop.is_set():
                head = _recv_exact(conn, 2)
                if head is None:
                    return
                wire = _recv_exact(conn, struct.unpack("!H", head)[0])
                if wire is None:
                    return
                out = self._safe_answer(wire, "tcp")
                if out is None:
                    continue  # a "timeout" name: stay silent
                try:
                    conn.sendall(struct.pack("!H", len(out)) + out)
                except OSError:
                    return


def _bind_pair(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """A UDP and a TCP socket on the same port (a free one when ``port`` is 0)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind((host, port))
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, udp.getsockname()[1]))
        except OSError:
            udp.close()
            tcp.close()
            if port:
                raise
            continue
        tcp.listen(16)
        return udp, tcp
    raise OSError("no free port for both UDP and TCP")


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        try:
            chunk = conn.recv(n - len(buf))
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk
    return buf
