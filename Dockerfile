# One image for every control-plane process; the compose file picks the command.
FROM python:3.12-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN useradd --system --uid 10001 --home /app slopbox
COPY pyproject.toml README.md ./
COPY api ./api
COPY proxy ./proxy
COPY workflows ./workflows
COPY activities ./activities
COPY db ./db
COPY billing ./billing
COPY notifications ./notifications
COPY metering ./metering
COPY cli ./cli
COPY devstack ./devstack
COPY orchestration ./orchestration
COPY providers ./providers
COPY openclaw ./openclaw
COPY gateway_simulator ./gateway_simulator
COPY telemetry ./telemetry
COPY web ./web
COPY worker.py settings.py ./
RUN pip install --no-cache-dir .
USER slopbox
EXPOSE 8000 8080 8081
ENTRYPOINT ["slopbox"]
CMD ["api"]
