# cacheproxy: slim Python, non-root, config mounted at /etc/cacheproxy/proxy.yaml.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY proxy ./proxy
RUN pip install '.[fast]' && useradd --system --uid 10001 --no-create-home cacheproxy \
  && install -d -o cacheproxy -g cacheproxy -m 0700 /var/lib/cacheproxy
# Quota counts across restarts (memory backend): server.state_dir's default,
# $XDG_STATE_HOME/cacheproxy. Mount a volume here to keep them across containers.
ENV XDG_STATE_HOME=/var/lib
COPY config/proxy.yaml /etc/cacheproxy/proxy.yaml

USER cacheproxy
EXPOSE 8080 8081
# The admin port listens on loopback by default, which is where the health check runs.
HEALTHCHECK --interval=15s --timeout=3s --start-period=5s --retries=3 \
  CMD python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:8081/health', timeout=2).status != 200)"
ENTRYPOINT ["cacheproxy"]
CMD ["serve", "-c", "/etc/cacheproxy/proxy.yaml"]
