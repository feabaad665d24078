# flipback: reverse proxy for model servers (SPEC §10).
#
#   docker build -t flipback .
#   docker run --rm -p 8080:8080 --stop-timeout 40 \
#     -v "$PWD/my.yaml:/etc/flipback/flipback.yaml:ro" flipback
#
# Every runtime dependency (aiohttp, uvloop, orjson, prometheus-client, pyyaml,
# httptools) ships manylinux wheels for amd64 and arm64, so the slim image needs no
# compiler and no second build stage.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore

# A fixed numeric uid/gid: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --system --gid 10001 flipback \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/flipback \
            --no-create-home --shell /usr/sbin/nologin flipback

WORKDIR /src

# Dependencies first, read from pyproject.toml ([project.dependencies] and the redis
# extra, for fleet state), so that a code change does not re-download them (layer cache). README.md is the project's
# `readme`: setuptools needs it to build.
COPY pyproject.toml README.md ./
RUN python -c 'import tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; print("\n".join(p["dependencies"] + p["optional-dependencies"]["redis"]))' > /tmp/pyproject-deps.txt \
    && pip install --no-cache-dir -r /tmp/pyproject-deps.txt && rm /tmp/pyproject-deps.txt

# Then the package itself (its deps are already there), and drop the sources.
COPY proxy ./proxy
RUN pip install --no-cache-dir --no-deps . \
 && cd / && rm -rf /src

# The default config; mount your own over it (a ConfigMap in Kubernetes). The build
# fails here if it does not validate.
COPY config/container.yaml /etc/flipback/flipback.yaml
RUN flipback check -c /etc/flipback/flipback.yaml

# state.file (rollback latches) lives here; it is also the working directory, so a
# config using the relative default `.flipback/state.json` can write it too.
RUN mkdir -p /var/lib/flipback && chown 10001:10001 /var/lib/flipback
WORKDIR /var/lib/flipback

USER 10001:10001

# 8080 data plane (server.listen), 9901 admin API (admin.listen). The image's default
# config keeps admin on loopback; see config/container.yaml to publish it.
EXPOSE 8080 9901

# Python stdlib only (slim has no curl). urlopen raises on a refused connection and on
# any non-2xx status, so the exit status is 1 whenever /healthz is not 200. If your
# config moves admin.listen off port 9901, override this with --health-cmd.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

# Exec form, no shell in between: flipback is PID 1 and gets SIGTERM itself, then
# drains (readiness 503, in-flight requests finish up to server.drain_timeout).
# `docker stop` allows 10s by default: pass --stop-timeout above drain_timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["flipback"]
CMD ["run", "-c", "/etc/flipback/flipback.yaml"]
