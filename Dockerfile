# Embassy's production image: network-container mode by default.
#
#   docker build -t embassy .
#   docker run -d --name embassy -v /var/run/docker.sock:/var/run/docker.sock \
#     -e DISCOVERY=etcd://172.17.0.1:2379 embassy
#   docker run -d --net=container:embassy -e BACKEND_WEB="web;8080/tcp" my-app
#
# Needs the debian:bookworm-slim and rust:bookworm base images from a registry. The tests do not
# use this file: they build their images offline with `docker import` (tests/src/docker.rs).

FROM rust:1-bookworm AS build
# protoc and the well-known .proto files it imports: discovery plugins that speak gRPC (etcd)
# generate their client at build time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Every workspace member: the binary and every plugin library (cdylib) in one build.
RUN cargo build --release --locked --workspace --exclude embassy-tests --exclude embassy-bench \
    && mkdir -p /out/plugins \
    && cp target/release/embassy /out/ \
    && cp target/release/libembassy_plugin_*.so /out/plugins/

FROM debian:bookworm-slim
COPY --from=build /out/embassy /usr/bin/embassy
# The default --plugin-dir: every library here is loaded at start.
COPY --from=build /out/plugins/ /usr/lib/embassy/plugins/
ENV EMBASSY_PLUGIN_DIR=/usr/lib/embassy/plugins
ENTRYPOINT ["/usr/bin/embassy"]
# Follow the engine whose socket is mounted; Embassy finds its own container and serves the
# containers started with --net=container:<this one>. Give DISCOVERY=<uri> (or --discovery).
CMD ["--docker", "unix:///var/run/docker.sock"]
