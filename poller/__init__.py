"""SQS poller: receives from Amazon SQS, publishes to a channel, deletes what the channel acknowledged."""
