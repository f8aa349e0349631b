-- fetch: take the next message off a Redis broker queue and register it as
-- unacknowledged in the same atomic step, for kombu's Redis transport.
--
-- Kombu pops with BRPOP and registers the message as unacknowledged in a second
-- round trip; a worker killed in between takes the message with it. Here both
-- happen in one script, so a fetched message is always either in its queue or in
-- the unacked hash, from where it is restored.
--
-- KEYS[1..n-3]  the queue lists, in the order to try them (priority, then fairness)
-- KEYS[n-2]     the unacked hash (delivery tag -> [message, exchange, routing key])
-- KEYS[n-1]     the unacked index (sorted set of delivery tags by fetch time)
-- KEYS[n]       the owners hash (delivery tag -> id of the consumer that fetched it)
-- ARGV[1]       the fetch time, seconds, as kombu scores its index
-- ARGV[2]       the consumer's id, or '' when it sends no heartbeat (not recorded)
--
-- Returns {list, message} for the first message found, or nil when all are empty.
-- A message that is not kombu's JSON (no delivery tag) is returned unregistered,
-- as kombu's own fetch would return it.
local n = #KEYS
for i = 1, n - 3 do
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
      redis.call('HSET', KEYS[n - 2], tag,
        '[' .. item .. ',' .. cjson.encode(exchange) .. ',' .. cjson.encode(routing_key) .. ']')
      redis.call('ZADD', KEYS[n - 1], ARGV[1], tag)
      if ARGV[2] ~= '' then
        redis.call('HSET', KEYS[n], tag, ARGV[2])
      end
    end
    return {KEYS[i], item}
  end
end
return false
