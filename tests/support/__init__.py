"""The tests' one package of helpers (import them as ``tests.support.X``; no sys.path tricks).

constants     values several test modules share (LOOPBACK, T0, timeouts, data folders)
waiting       wait_until: the one polling loop (wait on an event, never on the wall clock)
gateproc      the real gate (and smtp-sink) as a child process; free_port, require_tool, stop_pid
clockfile     the gate's movable wall clock (SMTPGATE_CLOCK_FILE), behind the gate_clock fixture
postfixproc   a private Postfix instance
downstream    the capturing SMTP downstream
dnsserver     an authoritative DNS server on loopback
rawsmtp       a byte-exact SMTP client on a socket; read_until_closed
redisproc     the shared Redis (DB 15, a prefix per test) and private redis-servers
quarantine    a message held in a real Maildir; `smtpgate quarantine` in-process
dot           a parser for the DOT graphs `smtpgate senders graph` prints
fuzzing attachment_samples   hypothesis sessions against the gate; MIME samples
"""
