-- fetch: take the next message off a Redis broker queue and register it as
-- unacknowledged in the same atomic step, for kombu's Redis transport.
--
-- Kombu pops with BRPOP and registers the message as unacknowledged in a second
-- round trip; a worker killed in between takes the message with it. Here both
-- happen in one script, so a fetched message is always either in its queue or in
-- the unacked hash, from where kombu restores it after the visibility timeout.
--
-- KEYS[1..n-2]  the queue lists, in the order to try them (priority, then fairness)
-- KEYS[n-1]     the unacked hash (delivery tag -> [message, exchange, routing key])
-- KEYS[n]       the unacked index (sorted set of delivery tags by fetch time)
-- ARGV[1]       the fetch time, seconds, as kombu scores its index
--
-- Returns {list, message} for the first message found, or nil when all are empty.
-- A message that is not kombu's JSON (no delivery tag) is returned unregistered,
-- as kombu's own fetch would return it.
local n = #KEYS
for i = 1, n - 2 do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    local properties = ok and type(message) == 'table' and message['properties']
    local tag = type(properties) == 'table' and properties['delivery_tag']
    if type(tag) == 'string' then
      local info = properties['delivery_info']
      local exchange, routing_key = cjson.null, cjson.null
      if type(info) == 'table' then
        exchange = info['exchange'] or cjson.null
        routing_key = info['routing_key'] or cjson.null
      end
      redis.call('HSET', KEYS[n - 1], tag,
        '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
      redis.call('ZADD', KEYS[n], ARGV[1], tag)
    end
    return {KEYS[i], item}
  end
end
return false
