# batchsync daemon image.
#   docker build -t batchsync .
#   docker run -d --name batchsync -v batchsync-data:/data -v /srv/inboxes:/inboxes \
#     -v /etc/batchsync/profiles:/profiles:ro -e MAILUP_FTP_PASSWORD=... batchsync
# Profiles in /profiles should keep their work folder under /data (work.dir = "/data/NAME"), their inbox under
# /inboxes (work.inbox_dir = "/inboxes/NAME"), and a SQLite CRM, if any, under /data too.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/batchsync
COPY pyproject.toml README.md ./
COPY batchsync ./batchsync
COPY profiles ./profiles
RUN pip install . \
    && useradd --system --uid 10001 --user-group --home-dir /data --no-create-home batchsync \
    && mkdir -p /data /inboxes /profiles \
    && chown batchsync:batchsync /data /inboxes

USER batchsync
VOLUME ["/data", "/inboxes", "/profiles"]

HEALTHCHECK --interval=5m --timeout=60s --start-period=1m --retries=3 \
    CMD ["batchsync", "--log-level", "error", "status", "--profile", "/profiles"]

ENTRYPOINT ["batchsync", "daemon"]
CMD ["/profiles"]
