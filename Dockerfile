# syntax=docker/dockerfile:1
# flywatch as a private Fly app (see fly.toml and deploy/README.md). `fly deploy` builds it on Fly's builder;
# locally: docker build -t flywatch .
#
# Stage 1 turns the source tree into wheels: flywatch's own and one for each of its dependencies.
# Stage 2 installs those wheels alone, offline, on a slim Python: no compiler, no build tools, no source tree,
# no pip cache, and runs flywatch as an unprivileged user.
#
# No HEALTHCHECK: Fly does not run Docker's; the check is fly.toml's [checks] on /healthz (port 9091).

FROM python:3.11-slim-bookworm AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# Only what the wheel is made of (.dockerignore keeps the rest of the tree out of the build context).
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheels are bind-mounted from the build stage, never copied: no layer keeps them. --no-index: nothing is
# fetched here, so the image runs exactly what stage 1 resolved.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels /wheels/flywatch-*.whl \
    && useradd --uid 10001 --user-group --create-home --shell /usr/sbin/nologin flywatch \
    && install --directory --owner=10001 --group=10001 --mode=0750 /data
# The policy. config/flywatch.yaml is the EXAMPLE: it manages an app named `shop` (the simulator's); do not
# deploy it as it is. Ship your own policy one of two ways (deploy/README.md, "The policy"):
#   - in the image: write it to config/flywatch.yaml, or COPY another file here AND let that file into the build
#     context with a `!path/to/policy.yaml` line in .dockerignore (which lets in config/flywatch.yaml only: any
#     other source is missing from the build and COPY fails);
#   - out of the image (webhook URLs are secrets): a Fly secret written to a file by fly.toml's [[files]], with
#     FLYWATCH_CONFIG pointing at it; the example baked in here is then never read.
COPY config/flywatch.yaml /etc/flywatch/flywatch.yaml
ENV FLYWATCH_CONFIG=/etc/flywatch/flywatch.yaml \
    FLYWATCH_STATE_URL=sqlite:////data/flywatch.db \
    FLYWATCH_LISTEN=[::]:9091
WORKDIR /home/flywatch
# Numeric, so the runtime needs no /etc/passwd lookup; Fly mounts the [[mounts]] volume for this uid and gid.
USER 10001:10001
EXPOSE 9091
ENTRYPOINT ["flywatch"]
CMD ["run"]
