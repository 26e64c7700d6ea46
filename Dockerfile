# roomwire's container image: the node built from the locked dependencies (the same command as
# CI's), run as a non-root user on a small Debian base.
#
#   podman build -t roomwire .            (or docker build)
#   podman run -p 8080:8080 -p 4433:4433/udp \
#     -v ./roomwire.toml:/etc/roomwire/roomwire.toml:ro roomwire
#
# The image listens on every interface, so the node refuses the insecure development auth mode:
# mount a configuration with auth.mode = "jwt" (and api.keys, mesh.nats_urls, ...), or set keys
# through ROOMWIRE__SECTION__KEY environment variables. tests/container.rs checks this file
# against the binary (ports, health path, the build command).

FROM docker.io/library/rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin roomwire

FROM docker.io/library/debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --create-home --home-dir /var/lib/roomwire roomwire \
 && mkdir -p /etc/roomwire && touch /etc/roomwire/roomwire.toml
COPY --from=build /src/target/release/roomwire /usr/local/bin/roomwire
USER 10001
WORKDIR /var/lib/roomwire
ENV ROOMWIRE_CONFIG=/etc/roomwire/roomwire.toml
ENV ROOMWIRE__SERVER__LISTEN='["0.0.0.0:8080"]'
ENV ROOMWIRE__WEBTRANSPORT__LISTEN='["0.0.0.0:4433"]'
EXPOSE 8080/tcp 4433/udp
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["/usr/local/bin/roomwire"]
