-- dataplane.lua: say how peers publish (the router calls it when it starts), and build the route
-- index from the subscription index once, for subscriptions written before the index existed.
--
-- KEYS[1] data plane settings (hash)   KEYS[2] subscription index (hash: "<peer> <pattern>[ <queue>]")
-- KEYS[3] route index (hash: pattern -> newline-separated "<peer>[ <queue>]")
-- KEYS[4] routing version (bumped when the mode changes: peers re-read the data plane then)
-- ARGV    field/value pairs for KEYS[1] (mode, inbox_maxlen, ...), mode first
-- Returns the number of subscriptions indexed now (0 when the route index was already built)
local indexed = 0
if redis.call('HGET', KEYS[1], 'routes') ~= '1' then
  redis.call('DEL', KEYS[3])
  local cursor = '0'
  repeat
    local r = redis.call('HSCAN', KEYS[2], cursor, 'COUNT', 1000)
    cursor = r[1]
    for i = 1, #r[2], 2 do
      local peer, pattern, queue = string.match(r[2][i], '^(%S+) (%S+) ?(%S*)$')
      if peer then
        local entry = queue ~= '' and (peer .. ' ' .. queue) or peer
        local old = redis.call('HGET', KEYS[3], pattern)
        redis.call('HSET', KEYS[3], pattern, old and (old .. '\n' .. entry) or entry)
        indexed = indexed + 1
      end
    end
  until cursor == '0'
end
local before = redis.call('HGET', KEYS[1], 'mode')
redis.call('HSET', KEYS[1], 'routes', '1', unpack(ARGV))
if before and before ~= ARGV[2] then  -- direct <-> routed: publishers must learn it now
  redis.call('INCR', KEYS[4])
end
return indexed
