# The relay for Fly, Render, Railway or any container host: the Procfile's command, as a non-root
# user, listening on $PORT, with its state on a volume mounted at /data (see README, Deploy).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PORT=8080 \
    RELAY_STATE_DIR=/data/state

WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt \
    && useradd --system --uid 10001 --no-create-home relay \
    && mkdir -p /data/state \
    && chown -R relay /data
COPY relay.py config.toml ./

USER relay
VOLUME /data
EXPOSE 8080
CMD ["python", "relay.py"]
