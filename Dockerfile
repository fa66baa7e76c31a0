# The relay for Fly, Render, Railway or any container host: the Procfile's command, as a non-root
# user, listening on $PORT, with its state on a volume mounted at /data (see README, Deploy). The
# container starts as root only to give that user the volume (deploy/entrypoint.sh).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PORT=8080 \
    RELAY_STATE_DIR=/data/state

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt \
    && useradd --system --uid 10001 --user-group --no-create-home relay
COPY deploy/entrypoint.sh /usr/local/bin/relay-entrypoint
COPY relay.py config.toml ./
COPY views ./views

VOLUME /data
EXPOSE 8080
ENTRYPOINT ["relay-entrypoint"]
CMD ["python", "relay.py"]
