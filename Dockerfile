# flywatch as a private Fly app. Build: docker build -t flywatch .
# Stage 1 builds the wheel; stage 2 installs it on a slim base, with no build tools, as a non-root user.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY daemon ./daemon
RUN pip install --no-cache-dir build==1.2.2 && python -m build --wheel --outdir /dist

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN useradd --create-home --uid 10001 flywatch
COPY --from=build /dist/*.whl /tmp/
RUN pip install --no-cache-dir /tmp/*.whl && rm /tmp/*.whl
# the policy: the example until you ship your own (COPY it over, or mount it at FLYWATCH_CONFIG)
COPY config/flywatch.yaml /etc/flywatch/flywatch.yaml
USER flywatch
WORKDIR /home/flywatch
ENV FLYWATCH_CONFIG=/etc/flywatch/flywatch.yaml
ENTRYPOINT ["flywatch"]
CMD ["run"]
