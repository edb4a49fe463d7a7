# PostgreSQL 15 from Debian's packages, for machines that cannot pull postgres:16 (docker/compose.local.yaml).
# It honours the two variables compose.yaml gives the official image: POSTGRES_PASSWORD and POSTGRES_DB.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \
    && rm -rf /var/lib/apt/lists/*
COPY docker/postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint.sh
ENV PGDATA=/var/lib/postgresql/data
EXPOSE 5432
ENTRYPOINT ["/bin/sh", "/usr/local/bin/postgres-entrypoint.sh"]
