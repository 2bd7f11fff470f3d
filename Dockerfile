# keyroute container image.
#
#   docker build -t keyroute:0.1.0 .
#   docker run --rm --stop-timeout 30 -p 8080:8080 -p 127.0.0.1:9901:9901 \
#       -v "$PWD/table:/etc/keyroute/table:ro" keyroute:0.1.0
#
# The admin port is published on the host's loopback only: without a token it
# is read-only, but it shows the table and the pods' addresses. On SIGTERM
# keyroute drains in-flight requests for up to proxy.shutdown_timeout (20 s in
# this image); `docker stop` sends SIGKILL after 10 s unless told otherwise, so
# give the container a longer stop timeout (--stop-timeout above, `docker stop
# -t 30`, or stop_grace_period in Compose), or lower the drain with
# KEYROUTE_PROXY_SHUTDOWN_TIMEOUT.
#
# The table is read from /etc/keyroute/table/assignment.json: mount the folder
# that holds it (it is watched, so editing or replacing the file takes effect
# at once). The config is /etc/keyroute/keyroute.toml (deploy/container/
# keyroute.toml); mount another one there, or set KEYROUTE_<SECTION>_<KEY>.
# Arguments after the image name are added to `keyroute run`
# (e.g. `--workers auto`); other commands: `--entrypoint keyroute`.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# ---- build: the keyroute wheel, installed with its dependencies into a venv.
# Every dependency ships binary wheels for this base; gcc is here only to
# compile keyroute's own fast path (Cython), and the final image gets the venv
# and nothing else from this stage (no compiler).
# constraints.txt pins the build backend and every dependency to an exact
# version (PIP_CONSTRAINT applies it to each pip call here), so a rebuild
# installs the same versions; the backend is installed first and the wheel
# built without isolation, so its version is the pinned one too.
# The second RUN imports every module of the source tree from the venv (so a
# module left out of the wheel fails the build, not the first request) and
# runs the command once.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PIP_CONSTRAINT=/src/constraints.txt
WORKDIR /src
# The compiler for the fast path; the stage is thrown away, so no version pins.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml setup.py README.md constraints.txt ./
COPY proxy/ proxy/
# setuptools' and Cython's versions come from constraints.txt (PIP_CONSTRAINT), hence no pins here.
# hadolint ignore=DL3013
RUN python -m pip install --no-deps setuptools cython \
    && python -m pip wheel --no-deps --no-build-isolation --wheel-dir /wheels . \
    && python -m venv /opt/keyroute \
    && /opt/keyroute/bin/pip install /wheels/keyroute-*.whl \
    && /opt/keyroute/bin/pip uninstall --yes pip
WORKDIR /
RUN /opt/keyroute/bin/python -c "import importlib, pathlib; src = pathlib.Path('/src'); \
[importlib.import_module('.'.join(p.relative_to(src).with_suffix('').parts).removesuffix('.__init__')) \
 for p in src.glob('proxy/**/*.py') if p.name != '__main__.py']" \
    && /opt/keyroute/bin/keyroute --help > /dev/null \
    && /opt/keyroute/bin/python -c "import proxy.native as n; assert n.ACTIVE, n.WHY_NOT"

# ---- final: slim Python, the venv, a non-root user.
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="keyroute" \
      org.opencontainers.image.description="Key-affinity HTTP routing proxy" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 keyroute \
    && useradd --system --uid 10001 --gid keyroute --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin keyroute \
    && mkdir -p /etc/keyroute/table
COPY --from=build /opt/keyroute /opt/keyroute
COPY deploy/container/keyroute.toml /etc/keyroute/keyroute.toml
ENV PATH="/opt/keyroute/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
WORKDIR /etc/keyroute
EXPOSE 8080 9901
# Healthy = ready to route: the admin listener answers and a table is in force.
# (Uses the image's Python: slim images have no curl.)
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:9901/-/readyz', timeout=2).status != 200)"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["keyroute", "run", "--config", "/etc/keyroute/keyroute.toml"]
