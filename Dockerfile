# smtpgate — container image.
#
#   docker build -t smtpgate .
#   docker run -d --name smtpgate -p 25:2525 \
#       -v /srv/smtpgate/etc:/etc/smtpgate:ro -v smtpgate-state:/var/lib/smtpgate \
#       --stop-timeout 75 smtpgate
#
# The gate runs as the unprivileged user `smtpgate` and, by the bundled sample config,
# listens on 2525 inside the container; publish it as port 25 with `-p 25:2525`
# (no capabilities, no setcap). To listen on 25 itself inside the container, note that
# `--cap-add NET_BIND_SERVICE` alone does not help a non-root process (it has no file or
# ambient capabilities); Docker >= 20.10 already sets net.ipv4.ip_unprivileged_port_start=0
# in the container's network namespace, and elsewhere
# `--sysctl net.ipv4.ip_unprivileged_port_start=25` does it.
#
# /etc/smtpgate holds gate.yaml, policies/ and rules/ (plugins); mount your own over it.
# /var/lib/smtpgate holds the SQLite state, /var/lib/smtpgate/quarantine the quarantine
# Maildir: both are volumes (a fleet may mount one shared quarantine, docs/operations.md).
# SIGTERM (docker stop) lets transactions in flight finish for up to 60 s: give it time
# (--stop-timeout 75; Docker's default is 10 s).

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY smtpgate ./smtpgate
COPY rules ./rules
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SMTPGATE_CONFIG=/etc/smtpgate/gate.yaml

RUN useradd --system --user-group --uid 10025 --home-dir /var/lib/smtpgate --no-create-home \
        --shell /usr/sbin/nologin smtpgate

COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels

# A working sample configuration: listen on 2525, relay to the host "mta" port 25 with
# XCLIENT, accept mail for localhost only. Replace it by mounting /etc/smtpgate.
RUN mkdir -p /etc/smtpgate/policies /etc/smtpgate/rules /var/lib/smtpgate/quarantine \
 && printf '%s\n' \
      '# smtpgate sample configuration (see SPEC section 2 for every key)' \
      'listen: ["0.0.0.0:2525"]' \
      'workers: auto' \
      'downstream: {host: mta, port: 25, xclient: true}' \
      'state: sqlite:///var/lib/smtpgate/state.db' \
      'quarantine: /var/lib/smtpgate/quarantine' \
      'policies: /etc/smtpgate/policies' \
      'plugins: [/etc/smtpgate/rules]' \
      'log: {format: text, level: info}' \
      > /etc/smtpgate/gate.yaml \
 && printf '%s\n' \
      '# the recipient domains this gate accepts, and the rules they get' \
      'domains: [localhost]' \
      'rules: []' \
      > /etc/smtpgate/policies/default.yaml \
 && chown -R smtpgate:smtpgate /var/lib/smtpgate \
 && chmod 0750 /var/lib/smtpgate && chmod 0700 /var/lib/smtpgate/quarantine

USER smtpgate
WORKDIR /var/lib/smtpgate
VOLUME ["/etc/smtpgate", "/var/lib/smtpgate", "/var/lib/smtpgate/quarantine"]
# The sample config listens on 2525; publish it as 25 (-p 25:2525).
EXPOSE 2525
# Healthy when GET /healthz on the metrics port answers 200 (listeners up, downstream
# answering): set SMTPGATE_METRICS=HOST:PORT to your gate.yaml's `metrics:` (-e ...).
# Without it, healthy when the gate greets with 220 on its port (SMTPGATE_HEALTH=HOST:PORT
# when your gate.yaml listens elsewhere); a 421 (draining, or at max_connections) is unhealthy.
ENV SMTPGATE_HEALTH=127.0.0.1:2525 SMTPGATE_METRICS=
HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, socket, sys, urllib.request\nmetrics = os.environ.get('SMTPGATE_METRICS')\nif metrics:\n    try:\n        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f'http://{metrics}/healthz', timeout=5):\n            sys.exit(0)\n    except OSError as e:\n        body = e.read().decode(errors='replace').strip() if hasattr(e, 'read') else ''\n        sys.exit(f'unhealthy: {e} {body}'.rstrip())\nhost, _, port = os.environ['SMTPGATE_HEALTH'].rpartition(':')\ntry:\n    with socket.create_connection((host.strip('[]'), int(port)), timeout=5) as s:\n        greeting = s.makefile('rb').readline()\n        s.sendall(b'QUIT\\r\\n')\nexcept OSError as e:\n    sys.exit(f'unhealthy: {e}')\nsys.exit(0 if greeting.startswith(b'220') else f'unhealthy: {greeting!r}')"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtpgate"]
CMD ["serve", "-c", "/etc/smtpgate/gate.yaml"]
