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

# The daemon listens on 8080 (set BATCHSYNC_LISTEN="" to turn the listener off): /healthz, /metrics, and a status
# page at /. Publish the port only to a private network or behind a reverse proxy.
ENV BATCHSYNC_LISTEN=0.0.0.0:8080
EXPOSE 8080

# /healthz when the listener is on (503: a failed or missed night, a stuck file, a profile that cannot be used,
# a stuck loop); otherwise `batchsync status`, which exits 4 for the same reasons.
HEALTHCHECK --interval=2m --timeout=60s --start-period=1m --retries=2 \
    CMD ["sh", "-c", "if [ -n \"$BATCHSYNC_LISTEN\" ]; then python -c \"import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + sys.argv[1] + '/healthz', timeout=50)\" \"${BATCHSYNC_LISTEN##*:}\"; else batchsync --log-level error status --profile /profiles >/dev/null; fi"]

ENTRYPOINT ["batchsync", "daemon"]
CMD ["/profiles"]
