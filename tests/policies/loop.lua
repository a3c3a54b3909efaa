-- Never returns.
return { schedule = function() while true do end end }
