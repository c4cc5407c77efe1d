"""The local stack: a Kafka-protocol broker, redis-server and an S3 endpoint as processes."""
