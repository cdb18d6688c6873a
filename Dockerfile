# pointgate: one image with bin/gateway, bin/billing and bin/devsim.
#
#   docker build -t pointgate .
#   docker compose up          (see docker-compose.yml)
#
# Built from Debian 12 packages only, like the local build (scripts/deps.sh);
# the build stage compiles with the project's Makefile (`make`: release build,
# -Werror), the runtime stage holds the binaries and their shared libraries.

FROM debian:12-slim AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential pkg-config ca-certificates \
        libmicrohttpd-dev libpq-dev libhiredis-dev libjansson-dev libsodium-dev \
        libevent-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN make -j"$(nproc)" && strip bin/*

FROM debian:12-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        libmicrohttpd12 libpq5 libhiredis0.14 libjansson4 libsodium23 \
        libevent-2.1-7 ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --no-create-home --home-dir /app --shell /usr/sbin/nologin pointgate \
 && install -d -o pointgate -m 700 /var/lib/pointgate/spill
WORKDIR /app
COPY --from=build /src/bin/ /app/bin/
COPY routes.example.json /app/routes.json
ENV PATH=/app/bin:$PATH \
    ROUTES_FILE=/app/routes.json \
    GATEWAY_SPILL_DIR=/var/lib/pointgate/spill \
    LOG_LEVEL=info
USER pointgate
# The services choose their command (docker-compose.yml); the gateway by default.
EXPOSE 8080 8081 9090
CMD ["gateway"]
